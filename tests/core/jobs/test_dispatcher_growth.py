"""Item 7 of issue #15, growth over days: the dispatcher's memory of the job ends it told
stays bounded however many jobs it runs (the row's notified_at is what lasts)."""

from __future__ import annotations

from core.host.handle import HostHandle
from core.jobs.dispatcher import RECENT_ENDS_KEPT, Dispatcher
from core.jobs.embedded_execution import EmbeddedExecution
from tests.support.silent_notifier import EndRecorder


async def test_the_ends_told_are_remembered_within_a_bound_and_each_told_once(runtime):
    recorder = EndRecorder()
    execution = EmbeddedExecution(HostHandle(runtime.host_config()))  # attached, never started
    dispatcher = Dispatcher(runtime.store, runtime.storage, recorder, execution, runtime.dispatcher_config("local"))
    policy = await runtime.quotas.policy(None)
    ids = []
    for n in range(RECENT_ENDS_KEPT + 30):
        job, refusal = await dispatcher.submit(policy, source_kind="url", source_url=f"https://example.com/{n}.mp3",
                                               source_name=f"{n}.mp3", model="tiny", stems="all", format="mp3",
                                               user_id=5)
        assert refusal is None
        await runtime.store.claim_next("local")
        await dispatcher.fail(job.id, "no luck", "error")
        ids.append(job.id)

    assert [job_id for job_id, _, _ in recorder.ended] == ids
    assert dispatcher.remembered_ends() <= RECENT_ENDS_KEPT
    # An end seen again after it left memory (a watcher, a late settle) is not told twice:
    # the row says it was told.
    for job_id in ids[:5]:
        await dispatcher.ended(await runtime.store.get(job_id))
    assert [job_id for job_id, _, _ in recorder.ended] == ids
