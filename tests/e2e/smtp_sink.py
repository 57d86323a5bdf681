"""A tiny SMTP sink (aiosmtpd) that stores every accepted message as a file.

Run as its own process so a test can really stop it (the port closes):

    /usr/bin/python3 smtp_sink.py --host 127.0.0.11 --port 2525 --dir DIR --name green

No AUTH is offered (like the legacy pop-before-smtp hosts). Each message is
written atomically (tmp file + rename) to DIR/<time>-<seq>.eml with a few
header lines prepended that record the envelope:

    X-Sink-Name: green
    X-Sink-Peer: 127.0.0.1:54321
    X-Sink-Helo: client.example
    X-Sink-Mail-From: joeuser@example.net
    X-Sink-Rcpt-To: x@example.net        (one line per recipient)

followed by the message data exactly as received.
"""

import argparse
import itertools
import os
import signal
import time

from aiosmtpd.controller import Controller


class SinkHandler:
    def __init__(self, directory, name):
        self.directory = directory
        self.name = name
        self.seq = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        n = next(self.seq)
        peer = session.peer
        head = [
            f"X-Sink-Name: {self.name}",
            f"X-Sink-Peer: {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"X-Sink-Peer: {peer}",
            f"X-Sink-Helo: {session.host_name}",
            f"X-Sink-Mail-From: {envelope.mail_from}",
        ]
        head += [f"X-Sink-Rcpt-To: {r}" for r in envelope.rcpt_tos]
        data = envelope.original_content or envelope.content
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        blob = ("\r\n".join(head) + "\r\n").encode("utf-8", "surrogateescape") + data
        base = f"{time.time_ns()}-{os.getpid()}-{n:06d}"
        tmp = os.path.join(self.directory, f".{base}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.directory, f"{base}.eml"))
        return "250 OK stored by sink " + self.name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--name", default="sink")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    handler = SinkHandler(args.dir, args.name)
    controller = Controller(
        handler,
        hostname=args.host,
        port=args.port,
        server_hostname=f"{args.name}.sink.test",
        ident=f"cutover-e2e sink {args.name}",
        decode_data=False,
        enable_SMTPUTF8=True,
        ready_timeout=10,
    )
    controller.start()
    print(f"sink {args.name} listening on {args.host}:{args.port}", flush=True)

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop:
            signal.pause()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
