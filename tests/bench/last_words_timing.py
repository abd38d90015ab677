"""How soon a killed process's keeper answers, against how soon the process ends (not a test):

    .venv/bin/python -m tests.bench.last_words_timing --mb 700 --busy 2

A stand-in replica (a process holding `--mb` MB and 40 threads, with a keeper started by
`LastWords` and one TCP connection in state FRESH) is SIGKILLed beside `--busy` processes
spinning on the CPU. Printed per run: when the client read the keeper's 502, and when the
process ended (its pidfd became readable, which is when the kernel has freed its memory
and closed its files). The keeper answers as soon as /proc shows every thread doomed
(`last_words_keeper.dying`); before that was in, it waited for the pidfd.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

# The stand-in replica: argv[1] MB, the port to accept one connection on from stdin.
_REPLICA = """
import socket, sys, threading, time
from serve.gateway.last_words import LastWords
from serve.gateway.last_words_keeper import State
blob = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(blob), 4096):
    blob[i] = 1
for _ in range(40):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
keeper = LastWords(slots=4)
assert keeper.start()
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()

class Transport:
    def get_extra_info(self, name):
        return conn if name == "socket" else None
    def get_write_buffer_size(self):
        return 0

slot = keeper.register(Transport())
slot.claim(object(), State.FRESH)
print("ready", flush=True)
time.sleep(3600)
"""


def one_run(mb: int, busy: int) -> tuple[float, float]:
    """(answered after, process ended after), in seconds from the kill."""
    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA, str(mb)], stdout=subprocess.PIPE, text=True
    )
    assert replica.stdout is not None
    port = int(replica.stdout.readline())
    client = socket.create_connection(("127.0.0.1", port))
    assert replica.stdout.readline().strip() == "ready"
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5)
        pidfd = os.pidfd_open(replica.pid)
        client.setblocking(False)
        killed = time.monotonic()
        os.kill(replica.pid, signal.SIGKILL)
        answered = ended = None
        while answered is None or ended is None:
            ready, _, _ = select.select([client.fileno(), pidfd], [], [], 10)
            assert ready, "neither an answer nor the process's end within 10 s"
            now = time.monotonic() - killed
            if client.fileno() in ready and answered is None:
                assert client.recv(65536).startswith(b"HTTP/1.1 502"), "not the keeper's 502"
                answered = now
            if pidfd in ready and ended is None:
                ended = now
        os.close(pidfd)
        return answered, ended
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        replica.wait()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=700, help="the stand-in replica's memory")
    parser.add_argument("--busy", type=int, default=2, help="processes spinning beside it")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    answers, ends = [], []
    for _ in range(args.runs):
        answered, ended = one_run(args.mb, args.busy)
        answers.append(answered)
        ends.append(ended)
        print(f"answered after {answered * 1e3:7.1f} ms, process ended after {ended * 1e3:7.1f} ms")
    print(
        f"median of {args.runs} ({args.mb} MB, {args.busy} busy): answered after "
        f"{statistics.median(answers) * 1000:.1f} ms, process ended after "
        f"{statistics.median(ends) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
