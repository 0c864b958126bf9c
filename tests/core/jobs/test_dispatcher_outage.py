"""A job that fails while the object store is down is still told to its user, once: the
deletion of its files meets the outage (for real: tests/support/s3.py's OutageProxy cuts
the store off), gives up after STEMBOT_TRANSIENT_RETRY_S and is left to the sweeper, and
never raises past the code that tells the user."""

from __future__ import annotations

from core.host.handle import HostHandle
from core.jobs.dispatcher import Dispatcher
from core.jobs.embedded_execution import EmbeddedExecution
from core.runtime import Runtime
from core.settings import Settings
from tests.support.s3 import OutageProxy
from tests.support.silent_notifier import EndRecorder


async def test_a_job_failed_while_the_store_is_down_is_told_once_and_uncharged(s3_server, sqlite_url, tmp_path):
    async with OutageProxy(s3_server.endpoint_url) as proxy:
        settings = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=sqlite_url,
                            s3_bucket=s3_server.bucket, s3_endpoint_url=proxy.endpoint,
                            aws_access_key_id=s3_server.access_key_id,
                            aws_secret_access_key=s3_server.secret_access_key, transient_retry_s=1)
        runtime = Runtime.from_settings(settings)
        try:
            await runtime.storage.start()
            recorder = EndRecorder()
            execution = EmbeddedExecution(HostHandle(runtime.host_config()))  # attached, never started
            dispatcher = Dispatcher(runtime.store, runtime.storage, recorder, execution,
                                    runtime.dispatcher_config("local"))
            policy = await runtime.quotas.policy(None)
            job, refusal = await dispatcher.submit(policy, source_kind="url", source_url="https://example.com/a.mp3",
                                                   source_name="a.mp3", model="tiny", stems="all", format="mp3",
                                                   user_id=5)
            assert refusal is None
            await runtime.store.claim_next("local")
            await runtime.store.reserve(job.id, 120.0)

            proxy.down()
            await dispatcher.fail(job.id, "the worker could not store the stems", "storage")
            assert proxy.refused > 0  # the deletion met the outage
            assert recorder.ended == [(job.id, "failed", "the worker could not store the stems")]
            row = await runtime.store.get(job.id)
            assert row.notified_at is not None and row.quota_state == "released"
            assert not dispatcher.held_back  # nothing waits on the store any more
        finally:
            proxy.up()
            await runtime.close()
