"""The ``auth`` stage: bearer tokens in constant time, per-key token buckets (SPEC §4)."""

from __future__ import annotations

from typing import Any

import pytest

from logstack._config import Settings
from logstack._context import StageContext
from logstack._envelope import Envelope
from logstack._errors import AuthenticationError, RateLimitedError, RejectError
from logstack._stage import StageConfig
from stages.auth import MAX_RETRY_AFTER_S, AuthStage

TOKEN_A = "logstack_alpha_0123456789abcdef"
TOKEN_B = "logstack_bravo_0123456789abcdef"
TOKEN_OFF = "logstack_off_0123456789abcdefgh"
TOKEN_NEW = "logstack_new_0123456789abcdefgh"
ADMIN = "logstack_admin_0123456789abcdef"
ALL_TOKENS = (TOKEN_A, TOKEN_B, TOKEN_OFF, TOKEN_NEW, ADMIN)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings(
    keys: dict[str, dict[str, Any]] | None = None, rps: float = 2.0, burst: float = 3.0
) -> Settings:
    if keys is None:
        keys = {
            TOKEN_A: {"name": "alpha"},
            TOKEN_B: {"name": "bravo"},
            TOKEN_OFF: {"name": "off", "active": False},
        }
    return Settings.model_validate(
        {
            "security": {
                "rate_limit_rps": rps,
                "rate_limit_burst": burst,
                "admin_token": ADMIN,
                "api_keys": keys,
            }
        }
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_stage(clock: FakeClock, conf: Settings | None = None) -> AuthStage:
    stage = AuthStage(StageConfig(), StageContext(settings=conf or settings()))
    stage._clock = clock
    return stage


def request(authorization: str | None) -> Envelope:
    return Envelope(request_id="req-1", authorization=authorization, body=b'{"entries": []}')


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refused(stage: AuthStage, authorization: str | None) -> RejectError:
    envelope = request(authorization)
    with pytest.raises(RejectError) as info:
        stage.process(envelope)
    assert_no_token(info.value)
    if isinstance(info.value, AuthenticationError):
        assert envelope.key is None
    else:  # rate limited: authenticated, so the rejection is counted under the key's name
        assert envelope.key is not None
    return info.value


def passes(stage: AuthStage, token: str) -> Envelope:
    envelope = request(bearer(token))
    stage.process(envelope)
    assert envelope.pending  # auth never answers an accepted request itself
    return envelope


def assert_no_token(error: RejectError) -> None:
    text = " ".join(
        [str(error), error.message, repr(error.details), repr(error.headers()), repr(error.body())]
    )
    for token in ALL_TOKENS:
        assert token not in text
        assert token[:20] not in text


def limited(stage: AuthStage, token: str) -> RateLimitedError:
    error = refused(stage, bearer(token))
    assert isinstance(error, RateLimitedError)
    return error


def rate_limited_count(stage: AuthStage, name: str) -> float:
    value = stage.context.metrics.registry.get_sample_value(
        "rate_limit_exceeded_total", {"token": name}
    )
    return value or 0.0


# --------------------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------------------


def assert_401(error: RejectError, reason: str) -> None:
    assert isinstance(error, AuthenticationError)
    assert error.status == 401
    assert error.code == "authentication_error"
    assert error.headers()["WWW-Authenticate"].startswith("Bearer")
    assert error.reason == reason


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header(clock: FakeClock, header: str | None) -> None:
    assert_401(refused(make_stage(clock), header), "missing_credentials")


@pytest.mark.parametrize(
    "header",
    [
        "Basic x",
        f"Basic {TOKEN_A}",
        "Bearer",
        "Bearer ",
        "Bearer a b",
        f"Bearer {TOKEN_A} {TOKEN_A}",
        f"Token {TOKEN_A}",
        TOKEN_A,
    ],
)
def test_malformed_header(clock: FakeClock, header: str) -> None:
    assert_401(refused(make_stage(clock), header), "malformed_credentials")


@pytest.mark.parametrize(
    "token",
    [
        "logstack_unknown_0123456789abcdef",
        TOKEN_A[:-1],  # a prefix of a real token
        TOKEN_A + "0",  # a real token with more after it
        TOKEN_A.upper(),
        ADMIN,  # the admin token cannot ingest unless it is also an API key
    ],
)
def test_unknown_token(clock: FakeClock, token: str) -> None:
    assert_401(refused(make_stage(clock), bearer(token)), "unknown_key")


def test_inactive_key(clock: FakeClock) -> None:
    error = refused(make_stage(clock), bearer(TOKEN_OFF))
    assert_401(error, "inactive_key")
    assert "inactive" in error.message
    # The same answer as for an unknown token: "API key is inactive" told whoever held a
    # revoked token that it was once real (a secrets audit); the reason tells operators.
    unknown = refused(make_stage(clock), bearer("logstack_never_0123456789abcdef"))
    assert error.body() == unknown.body()


def test_valid_token_sets_the_key(clock: FakeClock) -> None:
    stage = make_stage(clock)
    envelope = passes(stage, TOKEN_A)
    assert envelope.key is not None
    assert envelope.key.name == "alpha"
    assert envelope.key_name == "alpha"
    assert passes(stage, TOKEN_B).key_name == "bravo"


@pytest.mark.parametrize(
    "header", [f"bearer {TOKEN_A}", f"BEARER  {TOKEN_A}", f" Bearer {TOKEN_A} "]
)
def test_scheme_is_case_insensitive_and_spacing_tolerated(clock: FakeClock, header: str) -> None:
    envelope = request(header)
    make_stage(clock).process(envelope)
    assert envelope.key_name == "alpha"


# --------------------------------------------------------------------------------------
# Rate limiting
# --------------------------------------------------------------------------------------


def test_burst_then_429(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=2, burst=3))
    for _ in range(3):
        passes(stage, TOKEN_A)
    error = limited(stage, TOKEN_A)
    assert error.status == 429
    assert error.code == "rate_limit_exceeded"
    # A deficit of 1 token at 2 tokens/s is 0.5 s: Retry-After rounds up to a whole second.
    assert error.retry_after == 1
    assert error.headers() == {"Retry-After": "1"}
    assert error.details == {"rate_limit_rps": 2, "rate_limit_burst": 3}


def test_a_request_rate_checked_on_its_headers_takes_no_second_token(clock: FakeClock) -> None:
    """The ingest route takes the token before the body (``take_token``, published as the
    ``rate_limit`` service); the stage then only authenticates."""
    stage = make_stage(clock, settings(rps=2, burst=3))
    for _ in range(3):
        envelope = request(bearer(TOKEN_A))
        stage.take_token(stage.authenticate(envelope.authorization))
        envelope.rate_checked = True
        stage.process(envelope)
        assert envelope.key is not None and envelope.key.name == "alpha"
    with pytest.raises(RateLimitedError):
        stage.take_token(stage.authenticate(bearer(TOKEN_A)))
    assert rate_limited_count(stage, "alpha") == 1
    limited(stage, TOKEN_A)  # an envelope not checked on its headers is checked here


def test_a_token_given_back_is_taken_again_never_past_the_burst(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=2, burst=3))
    key = stage.authenticate(bearer(TOKEN_A))
    give_back = [stage.take_token(key) for _ in range(3)]
    with pytest.raises(RateLimitedError):
        stage.take_token(key)
    give_back[0]()  # that request was refused by the service itself (a 503)
    stage.take_token(key)
    for each in give_back:
        each()
        each()
    for _ in range(3):
        stage.take_token(key)
    with pytest.raises(RateLimitedError):  # given back, but the bucket held only 3
        stage.take_token(key)


@pytest.mark.parametrize(
    ("rps", "elapsed", "retry_after"),
    [
        (0.25, 0.0, 4),  # 1 token missing at 0.25/s
        (0.25, 1.0, 3),  # 0.25 refilled, 0.75 missing
        (0.25, 3.5, 1),  # 0.875 refilled, 0.125 missing: still at least 1 s
        (0.3, 0.0, 4),  # 3.33 s rounds up
        (1 / 16, 8.0, 8),  # 0.5 refilled, 0.5 missing
    ],
)
def test_retry_after_is_the_deficit_in_whole_seconds(
    clock: FakeClock, rps: float, elapsed: float, retry_after: int
) -> None:
    stage = make_stage(clock, settings(rps=rps, burst=1))
    passes(stage, TOKEN_A)
    clock.advance(elapsed)
    assert limited(stage, TOKEN_A).retry_after == retry_after


@pytest.mark.parametrize("rps", [1e-300, 1e-320])
def test_a_tiny_rate_is_a_429_with_a_retry_after_of_at_most_an_hour(
    clock: FakeClock, rps: float
) -> None:
    """The wait overflowed: a 300-digit ``Retry-After``, or a 500 (``ceil(inf)``)."""
    stage = make_stage(clock, settings(rps=rps, burst=1))
    passes(stage, TOKEN_A)
    assert limited(stage, TOKEN_A).retry_after == MAX_RETRY_AFTER_S == 3600


def test_retry_after_is_enough_to_pass(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=0.3, burst=2))
    passes(stage, TOKEN_A)
    passes(stage, TOKEN_A)
    clock.advance(1.7)
    wait = limited(stage, TOKEN_A).retry_after
    assert wait is not None
    clock.advance(wait)
    passes(stage, TOKEN_A)


def test_continuous_refill_keeps_fractions(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=1))
    passes(stage, TOKEN_A)
    # Three refused attempts a quarter second apart do not lose the quarters they accrued.
    for _ in range(3):
        clock.advance(0.25)
        limited(stage, TOKEN_A)
    clock.advance(0.25)
    passes(stage, TOKEN_A)
    limited(stage, TOKEN_A)


def test_refill_is_capped_at_burst(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=10, burst=3))
    passes(stage, TOKEN_A)
    clock.advance(3600)
    for _ in range(3):
        passes(stage, TOKEN_A)
    limited(stage, TOKEN_A)


def test_steady_rate(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=4, burst=1))
    # Exactly the refill rate is sustainable indefinitely ...
    for _ in range(20):
        passes(stage, TOKEN_A)
        clock.advance(0.25)
    passes(stage, TOKEN_A)
    # ... one more request at the same instant is not.
    assert limited(stage, TOKEN_A).retry_after == 1


def test_per_key_overrides(clock: FakeClock) -> None:
    keys = {
        TOKEN_A: {"name": "alpha", "rate_limit_rps": 0.5, "rate_limit_burst": 5},
        TOKEN_B: {"name": "bravo"},
        TOKEN_NEW: {"name": "fresh", "rate_limit_burst": 1},
    }
    stage = make_stage(clock, settings(keys, rps=2, burst=2))
    for _ in range(5):
        passes(stage, TOKEN_A)
    error = limited(stage, TOKEN_A)
    assert error.retry_after == 2  # one token at 0.5/s
    assert error.details == {"rate_limit_rps": 0.5, "rate_limit_burst": 5}
    for _ in range(2):
        passes(stage, TOKEN_B)
    assert limited(stage, TOKEN_B).details == {"rate_limit_rps": 2, "rate_limit_burst": 2}
    passes(stage, TOKEN_NEW)
    assert limited(stage, TOKEN_NEW).details == {"rate_limit_rps": 2, "rate_limit_burst": 1}


def test_keys_have_separate_buckets_and_counters(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=2))
    passes(stage, TOKEN_A)
    passes(stage, TOKEN_A)
    limited(stage, TOKEN_A)
    limited(stage, TOKEN_A)
    # alpha's exhaustion does not touch bravo.
    passes(stage, TOKEN_B)
    passes(stage, TOKEN_B)
    assert rate_limited_count(stage, "alpha") == 2
    assert rate_limited_count(stage, "bravo") == 0
    limited(stage, TOKEN_B)
    assert rate_limited_count(stage, "bravo") == 1
    # The metric is labelled by key name, never by token.
    exposition = stage.context.metrics.registry
    samples = [s for metric in exposition.collect() for s in metric.samples]
    for sample in samples:
        for token in ALL_TOKENS:
            assert token not in repr(sample)


def test_authentication_failures_do_not_use_the_bucket(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=1))
    for _ in range(5):
        refused(stage, bearer("logstack_unknown_0123456789abcdef"))
        refused(stage, bearer(TOKEN_OFF))
    passes(stage, TOKEN_A)
    assert rate_limited_count(stage, "off") == 0


# --------------------------------------------------------------------------------------
# Reload (SIGHUP)
# --------------------------------------------------------------------------------------


def test_reload_keeps_bucket_state_and_picks_up_keys(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=2))
    passes(stage, TOKEN_A)
    passes(stage, TOKEN_A)
    limited(stage, TOKEN_A)
    refused(stage, bearer(TOKEN_NEW))

    stage.reload(
        settings(
            {TOKEN_A: {"name": "alpha"}, TOKEN_NEW: {"name": "fresh"}},
            rps=1,
            burst=2,
        )
    )
    # alpha survived the reload with its empty bucket: still limited.
    limited(stage, TOKEN_A)
    # The new key authenticates with a full bucket; the removed one does not.
    passes(stage, TOKEN_NEW)
    passes(stage, TOKEN_NEW)
    limited(stage, TOKEN_NEW)
    assert_401(refused(stage, bearer(TOKEN_B)), "unknown_key")
    assert rate_limited_count(stage, "alpha") == 2


def test_reload_picks_up_new_limits(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=10))
    for _ in range(4):
        passes(stage, TOKEN_A)  # 6 tokens left
    # A smaller burst clamps what is left; a per-key rate replaces the default one.
    stage.reload(settings({TOKEN_A: {"name": "alpha", "rate_limit_rps": 0.25}}, rps=1, burst=2))
    passes(stage, TOKEN_A)
    passes(stage, TOKEN_A)
    error = limited(stage, TOKEN_A)
    assert error.retry_after == 4
    assert error.details == {"rate_limit_rps": 0.25, "rate_limit_burst": 2}
    clock.advance(4)
    passes(stage, TOKEN_A)


def test_reload_settles_tokens_accrued_at_the_old_rate(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=10))
    for _ in range(10):
        passes(stage, TOKEN_A)
    clock.advance(5)  # 5 tokens accrued at 1/s ...
    stage.reload(settings(rps=100, burst=10))  # ... before the rate became 100/s
    for _ in range(5):
        passes(stage, TOKEN_A)
    limited(stage, TOKEN_A)


def test_reload_deactivating_a_key(clock: FakeClock) -> None:
    stage = make_stage(clock)
    passes(stage, TOKEN_A)
    stage.reload(settings({TOKEN_A: {"name": "alpha", "active": False}}))
    assert_401(refused(stage, bearer(TOKEN_A)), "inactive_key")


def test_repr_and_messages_never_show_tokens(clock: FakeClock) -> None:
    stage = make_stage(clock, settings(rps=1, burst=1))
    envelope = passes(stage, TOKEN_A)
    for text in (repr(stage), repr(envelope), repr(envelope.key), str(envelope.key)):
        for token in ALL_TOKENS:
            assert token not in text
    # refused() checks every error for tokens; exercise each kind once more.
    refused(stage, bearer(TOKEN_A))
    refused(stage, f"Basic {TOKEN_A}")
    refused(stage, f"Bearer {TOKEN_A} extra")
    refused(stage, bearer(TOKEN_A + "x"))
    refused(stage, bearer(TOKEN_OFF))
