"""The `cnnlab` command: a thin layer over the Python API (each subcommand calls one function).

    args.py       the parser: subcommands, flags, and the types that check their values
    commands.py   what each subcommand does, through the API users call the same way

Errors users can fix are one line and exit 2; Ctrl-C exits 130; a bug is one line (CNNLAB_DEBUG=1 for the
traceback) and exits 1. Modules are imported by the subcommand that needs them: `cnnlab predict model.onnx`
and `cnnlab serve model.onnx` run on onnxruntime and never import PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from cnnlab import cluster, presets
from cnnlab.cli.args import build_parser
from cnnlab.cli.commands import (
    _data_config,
    cmd_data_check,
    cmd_evaluate,
    cmd_explain,
    cmd_lr_find,
    cmd_predict,
    cmd_runs,
    cmd_serve,
    cmd_summary,
    cmd_train,
    list_models,
)
from cnnlab.config import to_toml
from cnnlab.errors import CnnlabError, EveryProcessError, Interrupted


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int | None:
    """Carry out one parsed command; returns its exit code where it is not 0."""
    if args.command == "data" and args.data_command == "check":
        return cmd_data_check(args)
    if args.command == "data":
        from cnnlab.data import cache, description  # no PyTorch: cached data is described from its meta.json

        print(description.describe(cache.entry_for(_data_config(args).validate()).meta))
    elif args.command == "summary":
        cmd_summary(args)
    elif args.command == "doctor":
        from cnnlab import doctor

        info = doctor.report(args.seconds)
        print(json.dumps(info, indent=2) if args.json else doctor.format_report(info))
    elif args.command == "presets" and args.show:
        print(to_toml(presets.get(args.show), f"cnnlab preset {args.show!r}: edit, then `cnnlab train --config FILE`; "
                      "flags override the file, the file overrides the preset"), end="")
    elif args.command == "presets":
        for name, cfg in presets.PRESETS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    elif args.command == "models":
        print(list_models())
    elif args.command == "lr-find":
        cmd_lr_find(args)
    elif args.command == "train":
        return cmd_train(args, sys.argv[1:] if argv is None else argv)
    elif args.command == "evaluate":
        cmd_evaluate(args)
    elif args.command == "export":
        from cnnlab.deploy import export

        print(export.describe(export.export(args.run_dir, args.out, args.data, args.format, args.int8, args.max_drop,
                                            args.calibration_images)))
    elif args.command == "serve":
        cmd_serve(args)
    elif args.command == "report":
        from cnnlab.evaluation import report
        from cnnlab.evaluation.analysis import Interpretation

        interp = Interpretation.from_run(args.run_dir, args.data, device=args.device)
        print(f"wrote {report.write_report(args.run_dir, interp, args.out)}")
    elif args.command == "runs":
        cmd_runs(args)
    elif args.command == "predict":
        return cmd_predict(args)
    elif args.command == "explain":
        return cmd_explain(args)


def _lost_contact(e: Exception) -> bool:
    if "torch" not in sys.modules:
        return False
    from cnnlab import dist

    return dist.lost_contact(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and not (args.nproc or args.nnodes or args.max_restarts):
        cluster.adopt_slurm()  # under srun: SLURM's variables as torchrun's, before anything reads them (not
        # where this command is the launcher: `srun --ntasks-per-node 1 cnnlab train --nnodes N ...`)
    rank = os.environ.get("RANK", "0")
    where = f"(process {rank}) " if rank not in ("0", "") else ""  # under torchrun each process speaks for itself
    try:
        code = run(args, argv)
    except CnnlabError as e:
        every = isinstance(e, EveryProcessError)
        if not every:
            _tell_the_others(str(e))
        if not (every and cluster.local_rank()) and not getattr(e, "said", False):  # each machine's first
            # process says what every process met, once
            print(f"cnnlab: error: {'' if every else where}{e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if not where:  # the other processes stopped at the same step: process 0 speaks for all
            print(f"cnnlab: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader of our output left (`| head`): `entry` ends quietly
    except OSError as e:
        if e.filename is None:
            return _internal_error(e, where)
        print(f"cnnlab: error: {where}cannot use {e.filename}: {e.strerror or e}", file=sys.stderr)  # a mode-000
        return 2  # folder, a read-only disk, a path that vanished while we read: the user's to fix, not a bug
    except Exception as e:
        return _internal_error(e, where)
    return code or 0


def _internal_error(e: Exception, where: str) -> int:
    """A bug: one line for users, the traceback on request."""
    if os.environ.get("CNNLAB_DEBUG"):
        raise e
    if _lost_contact(e):  # another process failed first and says why on its machine; this one waits
        time.sleep(3)  # so that the launcher sees that process end first and reports its exit code
        return _say_why_lost()
    print(f"cnnlab: internal error: {where}{type(e).__name__}: {e} (set CNNLAB_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


def _tell_the_others(message: str) -> None:
    """Under several processes, leave the reason in the rendezvous store for processes on other machines."""
    if "torch" in sys.modules and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        from cnnlab import dist

        dist.tell(dist.World(cluster.rank(), int(os.environ["WORLD_SIZE"]), cluster.local_rank()), message)


def _say_why_lost() -> int:
    """A process that lost contact: if a process on another machine failed and told the store why, the first
    process of this machine says it (2); otherwise all stay quiet, and the launcher reports the process of this
    machine that failed, or that contact was lost (75)."""
    from cnnlab import dist

    told = dist.told(int(os.environ.get("WORLD_SIZE", "1")))
    first_here = cluster.rank() - cluster.local_rank()
    if told is None or first_here <= told[0] < first_here + int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        return dist.LOST_CONTACT
    if cluster.local_rank() == 0:
        print(f"cnnlab: error: {told[1]}", file=sys.stderr)
    return 2


def entry() -> None:
    """The `cnnlab` command: `main`, then leave without the interpreter's teardown.

    Every result is written (atomically, synced) and both streams are flushed before this exits; what is
    skipped is the finalization of PyTorch's and every other module's objects, 0.66 s after a `quick` run
    (measured). `main` itself returns normally, for callers in Python.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `cnnlab runs | head -1`: the reader has what it wanted; end quietly, as Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # do (SIGPIPE's status, 128 + 13)
        code = 141
    sys.stderr.flush()
    os._exit(code)
