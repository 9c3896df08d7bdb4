"""LogStack built-in stages, registered under the ``logstack.stages`` entry-point group."""
