"""The creation rate: a sliding window that counts accepted jobs only; quotas are 403, not 429."""

from __future__ import annotations

from tests.security.conftest import create, upload


def test_the_window_slides(service_env, limits) -> None:  # noqa: ANN001
    """A fixed window lets a burst at its end and another at the next one's start through."""
    from core.limits import LimitExceeded, take_job_slot
    from core.settings import get_settings

    limits(job_create_rate=3, job_create_window_s=10)
    settings = get_settings()
    t0 = 1_000_000_009.0  # one second before a multiple of the window
    for k in range(3):
        take_job_slot("u", settings, now=t0 + k * 0.1)
    for later in (t0 + 1.5, t0 + 9.9):  # a fixed window would have started afresh at t0 + 1
        try:
            take_job_slot("u", settings, now=later)
            raise AssertionError(f"a fourth creation within 10 s was accepted at +{later - t0:.1f} s")
        except LimitExceeded as exc:
            assert exc.status == 429 and exc.retry_after is not None and 1 <= exc.retry_after <= 10
    take_job_slot("u", settings, now=t0 + 10.05)  # the first slot has left the window
    take_job_slot("other-user", settings, now=t0 + 1.5)


def test_refused_requests_use_no_slot(member, limits) -> None:  # noqa: ANN001
    limits(job_create_rate=2, job_create_window_s=60, max_gpus_per_user=8)
    f = upload(member)
    for _ in range(5):
        r = create(member, f, gpus=64)
        assert r.status_code == 403 and r.json()["error"]["param"] == "gpus", r.text  # a quota: waiting never helps
        assert "retry-after" not in r.headers
        assert create(member, f, hyperparameters={"n_epochs": 0}).status_code == 400
    assert [create(member, f).status_code for _ in range(2)] == [200, 200]
    r = create(member, f)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and "retry-after" in r.headers


def test_quotas_answer_403_without_retry_after(member, limits) -> None:  # noqa: ANN001
    limits(max_active_jobs_per_user=1)
    f = upload(member)
    assert create(member, f).status_code == 200
    r = create(member, f)
    assert r.status_code == 403 and r.json()["error"]["code"] == "active_job_limit"
    assert "retry-after" not in r.headers
