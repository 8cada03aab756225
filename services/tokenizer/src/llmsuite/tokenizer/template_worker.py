"""A chat template worker process: `python -m llmsuite.tokenizer.template_worker`.

Renders one job at a time, read from stdin and answered on stdout as frames (a 4-byte
big-endian length, then UTF-8 JSON; JSON rather than pickle so that even a template
that escaped the Jinja sandbox could not make the tokenizer execute anything). Its
address space is capped (RLIMIT_AS) and each job gets a CPU-time allowance
(RLIMIT_CPU), so a runaway template fails here, or takes only this process down,
even if the tokenizer that sent it has gone. The tokenizer kills the process when a
job overruns its time or its caller goes away (`llmsuite.tokenizer.template_pool`).
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
from collections.abc import Sequence
from typing import IO, Any

from llmsuite.runtime.errors import LlmsuiteError
from llmsuite.tokenizer.chat_template import ChatTemplate, limit_exceeded

FRAME_HEADER = struct.Struct(">I")


def read_frame(stream: IO[bytes]) -> dict[str, Any] | None:
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (length,) = FRAME_HEADER.unpack(header)
    body = stream.read(length)
    if len(body) < length:
        return None
    parsed: dict[str, Any] = json.loads(body)
    return parsed


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False).encode("utf-8")
    return FRAME_HEADER.pack(len(body)) + body


def error_reply(error: LlmsuiteError) -> dict[str, Any]:
    return {"error": {"type": type(error).__name__, "message": error.message, "reason": error.reason,
                      "violations": [[v.field, v.description] for v in error.violations],
                      "metadata": dict(error.metadata)}}


def _address_space_in_use() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def render(job: dict[str, Any]) -> dict[str, Any]:
    from_request = bool(job.get("from_request"))
    try:
        template = ChatTemplate.compile(job["source"], from_request=from_request)
        text = template.render_context(job["context"], max_output_chars=int(job["max_output_chars"]),
                                       from_request=from_request)
        return {"text": text}
    except LlmsuiteError as error:
        reply = error_reply(error)
    except MemoryError:  # outside rendering itself, e.g. while compiling
        reply = error_reply(limit_exceeded("memory", "it allocated more than the renderer may",
                                           from_request=from_request))
    if reply["error"]["metadata"].get("resource") == "memory":
        # The heap may be in pieces: answer, then let the pool replace this process.
        reply["recycle"] = True
    return reply


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmsuite-template-worker", description=__doc__)
    parser.add_argument("--max-memory-bytes", type=int, required=True,
                        help="address space this process may add to what it uses after start-up")
    args = parser.parse_args(argv)
    limit = _address_space_in_use() + args.max_memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    while (job := read_frame(requests)) is not None:
        # Past the allowance the kernel sends SIGXCPU, which ends the process.
        allowance = int(_cpu_seconds_used() + float(job.get("cpu_seconds", 10.0))) + 1
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (allowance if hard == resource.RLIM_INFINITY else
                                                 min(allowance, hard), hard))
        reply = render(job)
        replies.write(encode_frame(reply))
        replies.flush()
        if reply.get("recycle"):
            return


if __name__ == "__main__":
    main()
