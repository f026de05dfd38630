"""``python -m hobbit_mlx.server``: the flags, loading the model, and running the HTTP server.

Flags follow ``mlx_lm.server`` (``--model``, ``--host``, ``--port``, ``--chat-template``,
``--chat-template-args``, ``--use-default-chat-template``, ``--allowed-origins``,
``--log-level``, and the sampling defaults) plus every ``hobbit_mlx.load`` option, shared with
``python -m hobbit_mlx.generate``. Bad flags, a port that is taken or a model that does not load
end the program with one ``error:`` line and exit status 2, before anything is served.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Sequence

from .. import cli_common as cli, cli_flags, cli_load
from .kept_prompts import KeepSettings

DEFAULT_PORT = 8080
DEFAULT_MAX_TOKENS = 512
REFERENCE_ID = "hobbit_mlx/reference_model"

log = logging.getLogger("hobbit_mlx.server")


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m hobbit_mlx.server",
        description="An OpenAI- and Anthropic-compatible HTTP server for an MoE model larger "
                    "than memory: experts stream from storage under one memory budget.")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on (default: %(default)s).")
    g.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="Port to listen on; 0 picks a free one (default: %(default)s).")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="The model id /v1/models reports and requests may name (default: "
                        "--model as given).")
    g.add_argument("--no-prompt-cache", action="store_true",
                   help="Prefill every prompt whole. By default the last request's KV cache is "
                        "kept, and a prompt that begins with the same tokens (a conversation "
                        "sent again with one more turn) only prefills the rest.")
    g.add_argument("--prompt-cache-size", type=int, default=10, metavar="N",
                   help="Earlier requests' KV caches kept on disk, so that several "
                        "conversations each resume where they stopped: a cache is written when "
                        "a prompt departs from it, and read back for a prompt it serves best, "
                        "where that saves prefill time (default: %(default)s; 0: only the last "
                        "request's, in memory; with --pipeline always 0).")
    g.add_argument("--prompt-cache-bytes", default=None, metavar="SIZE",
                   help="At most this much disk for them, e.g. 20GB (default: no limit but the "
                        "disk's free space, less 1 GiB).")
    g.add_argument("--prompt-cache-dir", default=None, metavar="DIR",
                   help="Where to write them (an existing directory; default: a new temporary "
                        "one). Their files are deleted when the server stops.")
    for flag in ("--decode-concurrency", "--prompt-concurrency"):  # (mlx_lm.server's)
        g.add_argument(flag, type=int, default=1, metavar="N",
                       help="mlx_lm.server's batching: here only 1 (the default). Requests are "
                            "served one at a time, in the order they come: the memory budget "
                            "plans one sequence's KV cache and activations.")
    g.add_argument("--allowed-origins", type=lambda x: x.split(","), default=["*"],
                   help="Comma-separated origins allowed by CORS (default: *).")
    g.add_argument("--log-level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="Logging level; INFO logs one line per request (default: %(default)s).")
    cli_flags.add_model_args(parser)
    cli_flags.add_sampling_args(parser, default_max_tokens=DEFAULT_MAX_TOKENS)
    cli_flags.add_template_args(parser)
    t = parser.add_argument_group("chat template (server)")
    t.add_argument("--chat-template", default=None,
                   help="A chat template (Jinja text, or a file holding it) replacing the "
                        "tokenizer's.")
    t.add_argument("--chat-template-args", dest="chat_template_config", default=None,
                   metavar="JSON",
                   help="mlx_lm.server's name for --chat-template-config: a JSON object of "
                        "arguments for apply_chat_template, e.g. '{\"enable_thinking\":false}'.")
    return parser


def check_server_args(args: argparse.Namespace) -> None:
    cli_flags.check_args(args)
    if not 0 <= args.port <= 65535:
        raise cli.CLIError(f"--port must be between 0 and 65535, not {args.port}")
    if args.max_kv_size is not None:  # (a sampling flag generate and chat share)
        raise cli.CLIError("--max-kv-size does not run in the server: it serves the whole "
                           "context, as far as the memory budget holds (the startup log says how "
                           "far), as mlx_lm.server does")
    for flag in ("decode_concurrency", "prompt_concurrency"):
        if getattr(args, flag) != 1:
            raise cli.CLIError(
                f"--{flag.replace('_', '-')} {getattr(args, flag)}: requests are served one at "
                "a time (the memory budget plans one sequence's KV cache and activations, and "
                "a batch of sequences would read the union of their experts each step); "
                "leave it at 1")
    if args.chat_template is not None:
        path = Path(args.chat_template).expanduser()
        if "{" not in args.chat_template and path.is_file():
            args.chat_template = path.read_text()
    cli_flags.technique_options(args)  # its checks, before the model loads
    args.keep_prompts = keep_settings(args)


def keep_settings(args: argparse.Namespace) -> "KeepSettings":
    """``--prompt-cache-size/-bytes/-dir``, checked: the prompt caches kept on disk."""
    import os

    from ..budget import parse_size

    if args.prompt_cache_size < 0:
        raise cli.CLIError(f"--prompt-cache-size must be 0 or more, not {args.prompt_cache_size}")
    max_bytes = None
    if args.prompt_cache_bytes is not None:
        try:
            max_bytes = parse_size(args.prompt_cache_bytes)
        except ValueError as e:
            raise cli.CLIError(f"--prompt-cache-bytes {args.prompt_cache_bytes}: {e}") from None
        if max_bytes <= 0:
            raise cli.CLIError(f"--prompt-cache-bytes must be more than 0, not "
                               f"{args.prompt_cache_bytes} (--prompt-cache-size 0 keeps none)")
    directory = args.prompt_cache_dir
    if directory is not None:
        if not directory.strip():
            raise cli.CLIError("--prompt-cache-dir is empty: give a directory")
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise cli.CLIError(f"--prompt-cache-dir {directory}: "
                               + ("not a directory" if path.exists() else "no such directory"))
        if not os.access(path, os.W_OK | os.X_OK):
            raise cli.CLIError(f"--prompt-cache-dir {directory}: not writable")
        directory = str(path)
    return KeepSettings(directory, args.prompt_cache_size, max_bytes)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails fast."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise cli.CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from .app import create_app
    from .dispatch import Dispatcher
    from .params import Defaults
    from .prompts import Template
    from .worker import Worker

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    cli_load.join_pipeline(args)
    check_server_args(args)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    group = getattr(args, "pipeline_group", None)
    if group is not None and group.rank() != 0:  # rank 0 serves; this rank follows it
        return _follow(args)
    sock = bind(args.host, args.port)

    def load():  # on the generation thread
        model, tokenizer, _ = cli_load.load_model(args)
        if args.use_default_chat_template:
            cli.use_default_template(tokenizer)
        return model, tokenizer

    model_id = args.served_model_name or args.model or REFERENCE_ID
    worker = Worker(load, model_id, reuse_prompt=not args.no_prompt_cache,
                    keep=args.keep_prompts)
    try:
        worker.start()
    except BaseException:
        sock.close()
        raise
    _watch(worker, args)
    names = {"default_model", str(worker.model_dir), Path(worker.model_dir).name,
             Path(model_id).name}  # (the bundled model's "reference_model" too)
    if args.model:
        names.add(args.model)
    defaults = Defaults(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                        top_k=args.top_k, min_p=args.min_p,
                        min_tokens_to_keep=args.min_tokens_to_keep,
                        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
                        repetition_penalty=args.repetition_penalty,
                        repetition_context_size=args.repetition_context_size, seed=args.seed)
    template = Template(use_template=not args.ignore_chat_template,
                        system_prompt=args.system_prompt, kwargs=args.chat_template_kwargs)
    options = cli_flags.technique_options(args)
    options.update(memory_budget=args.memory_budget, expert_residency=args.expert_residency)
    info = {"model_dir": str(worker.model_dir), "options": options}
    dispatcher = Dispatcher(worker, template, defaults, names, info)
    app = create_app(dispatcher, args.allowed_origins)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    log.info("serving %s (context limit %d tokens, set by the %s) at %s", model_id,
             worker.context_limit, worker.context_set_by, _url(sock))
    server = _server(config, worker)
    worker.on_dead = lambda: server.handle_exit(signal.SIGTERM, None)
    # uvicorn raises the signal it stopped on again once it has stopped: Ctrl-C comes back as a
    # KeyboardInterrupt, and SIGTERM, at its default action, ended the process with status 143
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        worker.stop()
    if worker.error is not None:  # the pipeline broke (its log line gave the cause)
        raise cli.CLIError(f"the pipeline broke: {type(worker.error).__name__}: {worker.error}")
    return 0


class _Terminated(Exception):
    """SIGTERM, after the server has stopped on it."""


def _terminated(signum, frame) -> None:
    raise _Terminated()


# of uvicorn's graceful shutdown (timeout_graceful_shutdown, 5 s): the part the request being
# generated may still use to finish; the rest is for its 503 to reach the client
SHUTDOWN_GRACE_S = 3.0


def _server(config, worker):
    """uvicorn's server, which tells the worker when it starts shutting down (Ctrl-C, SIGTERM,
    a broken pipeline): the requests waiting for it are answered with a 503 at once, and the
    one generating gets a few seconds before it is too. Otherwise each waited until uvicorn gave
    up and cancelled it: a plain-text 500, or a stream cut without an event."""
    import uvicorn

    class Server(uvicorn.Server):
        signals = 0

        def handle_exit(self, sig: int, frame) -> None:
            self.signals += 1
            if not worker.closing:
                running = "" if worker.current is None else (
                    f", the current one has {SHUTDOWN_GRACE_S:.0f} s to finish (Ctrl-C again: "
                    "stop it now)")
                log.info("shutting down: %d queued request(s) refused%s", worker.queued, running)
                worker.close_soon(SHUTDOWN_GRACE_S)
            elif self.signals == 2:  # the grace ends now; its 503 still goes out (uvicorn's
                worker.close_soon(0.0)  # force quit, which cancels it, is a third signal)
                return
            super().handle_exit(sig, frame)

    return Server(config)


def _watch(worker, args: argparse.Namespace) -> None:
    """With a pipeline, the watchdog (an idle rank 0 says it is alive more often than the
    watchdog's timeout)."""
    from ..pipeline import pipeline_of

    pipe = pipeline_of(worker.model)
    if pipe is not None:
        worker.heartbeat_s = min(10.0, args.pipeline_timeout / 4)
        pipe.watchdog(args.pipeline_timeout)


def _follow(args: argparse.Namespace) -> int:
    """A pipeline rank other than 0: load its layers and run what rank 0 serves, until rank 0
    ends (its Ctrl-C ends every rank; this rank ignores its own)."""
    from .worker import Worker

    def load():
        model, tokenizer, _ = cli_load.load_model(args)
        if args.use_default_chat_template:
            cli.use_default_template(tokenizer)
        return model, tokenizer

    worker = Worker(load, args.served_model_name or args.model or REFERENCE_ID,
                    reuse_prompt=not args.no_prompt_cache)  # (as rank 0: the ranks feed alike)
    worker.start()
    _watch(worker, args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker.thread.join()
    if worker.error is not None:
        raise worker.error
    return 0
