"""The control socket driven by qemu.qmp, the QEMU project's own QMP client library, unchanged.

Usage: qmp_client_test.py REWIND_BINARY
Starts `rewind serve` with a control socket, then marker-add, marker-list and an online
recover through qemu.qmp, checking the replies, the JOB_COMPLETED event, the recovered
image's size and error classes. Prints '1 passed, 0 failed' on success.
"""
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient


async def exercise(control: str, output: str) -> None:
    qmp = QMPClient("rewind-test")
    await qmp.connect(control)
    added = await qmp.execute("marker-add", {"name": "from-qemu-qmp", "note": "python"})
    assert added["seq"] == 1, added
    assert added["time-ns"] > 0, added
    markers = await qmp.execute("marker-list")
    assert [m["name"] for m in markers] == ["from-qemu-qmp"], markers
    assert markers[0]["source"] == "host"
    job = await qmp.execute("recover", {"marker": "from-qemu-qmp", "output": output})
    async for event in qmp.events:
        if event["event"] == "JOB_COMPLETED" and event["data"]["id"] == job["job-id"]:
            assert event["data"]["status"] == "concluded", event
            break
    jobs = await qmp.execute("query-jobs")
    assert jobs[0]["status"] == "concluded", jobs
    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command accepted")
    except Exception as error:  # qemu.qmp raises ExecuteError with the error class
        assert "CommandNotFound" in str(error) or "has not been found" in str(error), error
    try:
        await qmp.execute("marker-get", {"name": "never"})
        raise AssertionError("unknown marker found")
    except ExecuteError as error:
        assert error.error_class == "MarkerNotFound", error.error_class
    await qmp.disconnect()


def main() -> int:
    rewind = sys.argv[1]
    with tempfile.TemporaryDirectory() as work:
        control = os.path.join(work, "control.sock")
        daemon = subprocess.Popen([rewind, "serve", os.path.join(work, "disk.img"), "--size", "8M",
                                   "--socket", os.path.join(work, "vhost.sock"), "--control", control])
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(control):
                assert daemon.poll() is None, "rewind serve exited"
                assert time.monotonic() < deadline, "no control socket"
                time.sleep(0.01)
            output = os.path.join(work, "recovered.img")
            asyncio.run(exercise(control, output))
            assert os.path.getsize(output) == 8 << 20
        finally:
            daemon.terminate()
            assert daemon.wait(timeout=30) == 0, "rewind serve did not exit cleanly"
    print("qemu.qmp: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
