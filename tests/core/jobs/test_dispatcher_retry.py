"""A job the operator retried (`stembot jobs retry`) has its next end reported to the user
too: the dispatcher reports each end of a job once, not each job once."""

from __future__ import annotations

from core.host.handle import HostHandle
from core.jobs.dispatcher import Dispatcher
from core.jobs.embedded_execution import EmbeddedExecution
from core.jobs.job import JobState
from tests.support.silent_notifier import EndRecorder


async def test_each_end_of_a_retried_job_is_reported_once(runtime):
    recorder = EndRecorder()
    execution = EmbeddedExecution(HostHandle(runtime.host_config()))  # attached, never started
    dispatcher = Dispatcher(runtime.store, runtime.storage, recorder, execution, runtime.dispatcher_config("local"))
    policy = await runtime.quotas.policy(None)
    job, refusal = await dispatcher.submit(policy, source_kind="url", source_url="https://example.com/a.mp3",
                                           source_name="a.mp3", model="tiny", stems="all", format="mp3", user_id=5)
    assert refusal is None
    await runtime.store.claim_next("local")

    await dispatcher.fail(job.id, "the first end", "error")
    await dispatcher.ended(await runtime.store.get(job.id))  # seen again (e.g. by a watcher): not twice
    assert recorder.ended == [(job.id, "failed", "the first end")]

    assert await runtime.store.retry(job.id) is JobState.failed
    await runtime.store.claim_next("local")
    await dispatcher.fail(job.id, "the second end", "error")
    assert recorder.ended == [(job.id, "failed", "the first end"), (job.id, "failed", "the second end")]
