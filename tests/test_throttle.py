"""The failed-login throttle, without a server."""

from pilotboat.security.throttle import FailureThrottle


def test_blocks_after_max_failures_until_the_window_passes() -> None:
    throttle = FailureThrottle(max_failures=3, window_seconds=60)
    for moment in (0.0, 1.0, 2.0):
        assert throttle.retry_after("a", now=moment) == 0
        throttle.failed("a", now=moment)
    assert throttle.retry_after("a", now=3.0) == 58
    assert throttle.retry_after("b", now=3.0) == 0
    assert throttle.retry_after("a", now=60.5) == 0  # the first failure left the window


def test_success_clears_and_capacity_is_bounded() -> None:
    throttle = FailureThrottle(max_failures=2, window_seconds=60, capacity=5)
    throttle.failed("a", now=0.0)
    throttle.failed("a", now=0.0)
    assert throttle.retry_after("a", now=1.0) > 0
    throttle.succeeded("a")
    assert throttle.retry_after("a", now=1.0) == 0
    for index in range(50):
        throttle.failed(f"k{index}", now=0.0)
    assert len(throttle._failures) <= 5
