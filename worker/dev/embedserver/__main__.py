"""``python -m worker.dev.embedserver``: serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from worker.dev.embedserver.backends import BackendUnavailableError, load_backend
from worker.dev.embedserver.http import start_server
from worker.dev.embedserver.state import DEFAULT_DIMENSIONS, FaultError, Faults, Memo, ServerState
from worker.signals import on_stop_signals


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.dev.embedserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 lets the OS choose")
    p.add_argument("--backend", choices=("hash", "minilm"), default="hash")
    p.add_argument(
        "--dimensions", type=int, default=DEFAULT_DIMENSIONS, help="default when a request names none"
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument(
        "--latency-jitter-ms", type=float, default=0.0, help="each request waits latency + uniform(0, this)"
    )
    p.add_argument("--slow-rate", type=float, default=0.0)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--rate-429", type=float, default=0.0)
    p.add_argument("--retry-after", type=float, default=1.0, help="seconds, in the Retry-After header")
    p.add_argument("--rate-500", type=float, default=0.0)
    p.add_argument("--rate-503", type=float, default=0.0)
    p.add_argument("--outage", action="store_true")
    p.add_argument("--reject-marker", default=None)
    p.add_argument(
        "--max-inputs",
        type=int,
        default=0,
        help="refuse requests of more inputs with 413, as text-embeddings-inference does past its "
        "--max-client-batch-size (0: only OpenAI's limit of 2048, answered 400)",
    )
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    p.add_argument("--budget-tpm", type=float, default=0.0, help="a provider's tokens per minute (0: none)")
    p.add_argument("--budget-rpm", type=float, default=0.0, help="a provider's requests per minute (0: none)")
    p.add_argument(
        "--budget-window",
        type=float,
        default=60.0,
        help="seconds of those limits the buckets hold (60: a whole minute; less: a shorter span, "
        "as providers also enforce)",
    )
    p.add_argument(
        "--max-input-tokens", type=int, default=8191, help="tokens per input, as OpenAI (0: no limit)"
    )
    p.add_argument(
        "--max-request-tokens", type=int, default=300_000, help="tokens per request, as OpenAI (0: no limit)"
    )
    p.add_argument(
        "--memo",
        type=int,
        default=0,
        help="answer the last N distinct texts from memory, not computed again (0: none): a remote "
        "API's compute is not on this machine, and the bench's instant server should not be either",
    )
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace, state: ServerState) -> None:
    stop = asyncio.Event()
    on_stop_signals(lambda _: stop.set())
    runner, url = await start_server(state, args.host, args.port, access_log=args.access_log)
    try:
        print(f"listening {url}", flush=True)  # noqa: T201 - the parent process reads the port from this line
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.access_log else logging.WARNING, stream=sys.stderr)
    try:
        faults = Faults().merged(
            {
                "latency_ms": args.latency_ms,
                "latency_jitter_ms": args.latency_jitter_ms,
                "slow_rate": args.slow_rate,
                "slow_ms": args.slow_ms,
                "rate_429": args.rate_429,
                "retry_after": args.retry_after,
                "rate_500": args.rate_500,
                "rate_503": args.rate_503,
                "outage": args.outage,
                "reject_marker": args.reject_marker or None,
                "max_inputs": args.max_inputs,
                "shuffle": args.shuffle,
                "seed": args.seed,
                "budget_tpm": args.budget_tpm,
                "budget_rpm": args.budget_rpm,
                "budget_window": args.budget_window,
                "max_input_tokens": args.max_input_tokens,
                "max_request_tokens": args.max_request_tokens,
            }
        )
        backend = load_backend(args.backend)
    except (FaultError, BackendUnavailableError) as exc:
        print(f"embedserver: {exc}", file=sys.stderr)  # noqa: T201 - CLI error line
        return 2
    if not 1 <= args.dimensions <= backend.max_dimensions:
        print(f"embedserver: --dimensions must be 1..{backend.max_dimensions}", file=sys.stderr)  # noqa: T201 - CLI error line
        return 2
    if args.memo < 0:
        print("embedserver: --memo must be 0 or more", file=sys.stderr)  # noqa: T201 - CLI error line
        return 2
    state = ServerState(
        backend=backend, dimensions=args.dimensions, api_key=args.api_key, faults=faults, memo=Memo(args.memo)
    )
    try:
        import uvloop  # optional speed-up
    except ImportError:
        asyncio.run(_serve(args, state))
    else:
        uvloop.run(_serve(args, state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
