"""The ``fod`` command: ``fod_core``'s commands plus the stack, the pipeline and the main job.

fod stack up|down|status             the embedded S3 + MLflow on 127.0.0.1
fod pipeline compile|run|submit      the KFP training pipeline
fod demo                             the main job (stack, DVC data, pipeline, registry)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fod_core import cli as core_cli


def cmd_stack(args: argparse.Namespace) -> int:
    from components.stack import EmbeddedStack

    stack = EmbeddedStack(args.home, s3_port=args.s3_port, mlflow_port=args.mlflow_port)
    if args.action == "up":
        settings = stack.up()
        print(json.dumps({"status": "up", **settings.public_dict()}, indent=2))
        print(f"credentials: {stack.home / 'credentials.env'} (git-ignored)")
    elif args.action == "down":
        stack.down()
        print("stack stopped")
    else:
        status = stack.status()
        print(json.dumps(status, indent=2))
        return 0 if status["running"] else 1
    return 0


def _pipeline_arguments(args: argparse.Namespace) -> dict:
    from components.data_version import read_data_version, remote_url
    from components.settings import load_settings
    from components.tracking import code_version

    settings = load_settings()
    arguments = {
        "dvc_remote": args.dvc_remote or remote_url(settings),
        "data_version": args.data_version or read_data_version(args.dvc_file).md5,
        "categories": args.categories,
        "data_format": args.format,
        "code_version": code_version(),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "model_size": args.model_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
    }
    return arguments


class SubmitError(RuntimeError):
    """The KFP endpoint cannot take the pipeline."""


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines.training import COMPILED_YAML, compile_pipeline, run_local

    if args.action == "compile":
        print(compile_pipeline(args.out or COMPILED_YAML))
        return 0
    if args.action == "run":
        from components.settings import load_settings

        load_settings().export()
        result = run_local(_pipeline_arguments(args), args.pipeline_root)
        print(f"pipeline finished; outputs under {result.pipeline_root}")
        return 0
    # submit
    import kfp

    if not args.host:
        raise SubmitError("`fod pipeline submit` needs --host URL of a KFP endpoint")
    try:
        client = kfp.Client(host=args.host)
    except Exception as error:  # kfp raises urllib3/ApiException types on connection errors
        raise SubmitError(
            f"KFP endpoint {args.host} is unreachable or refused the client: "
            f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error
    path = compile_pipeline(args.out or COMPILED_YAML)
    run = client.create_run_from_pipeline_package(
        str(path), arguments=_pipeline_arguments(args), experiment_name=args.experiment
    )
    print(f"submitted run {run.run_id} to {args.host}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.main_job import DemoSettings, run_main_job

    summary = run_main_job(".", demo=DemoSettings(epochs=args.epochs))
    print("\nFOD main job done")
    print(f"  MLflow UI          {summary['mlflow_ui']}")
    print(
        f"  registered model   {summary['registered_model']} "
        f"v{summary['champion_version']} (alias champion; latest v{summary['latest_version']})"
    )
    print(f"  metrics            {summary['champion_metrics']}")
    print(f"  data version       {summary['data_version']}")
    print(f"  wall time          {summary['seconds']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="the embedded S3 (SeaweedFS) + MLflow on 127.0.0.1")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.add_argument("--home", type=Path, help="state folder (default ./.fod or FOD_HOME)")
    stack.add_argument("--s3-port", type=int, default=8333)
    stack.add_argument("--mlflow-port", type=int, default=5055)
    stack.set_defaults(func=cmd_stack)

    pipeline = sub.add_parser("pipeline", help="compile, run locally or submit the pipeline")
    pipeline.add_argument("action", choices=["compile", "run", "submit"])
    pipeline.add_argument("--out", type=Path, help="compiled YAML path")
    pipeline.add_argument("--host", help="KFP endpoint for submit")
    pipeline.add_argument("--experiment", default="fod")
    pipeline.add_argument("--pipeline-root", type=Path, default=Path("runs/pipeline"))
    pipeline.add_argument("--dvc-file", type=Path, default=Path("data.dvc"))
    pipeline.add_argument("--dvc-remote", help="default: s3://<bucket>/dvc")
    pipeline.add_argument("--data-version", help="default: the md5 in --dvc-file")
    pipeline.add_argument("--categories", nargs="+", default=["widget"])
    pipeline.add_argument("--format", default="mvtec")
    pipeline.add_argument("--backbone", default="efficientnet_lite0")
    pipeline.add_argument("--image-size", type=int, default=256)
    pipeline.add_argument("--model-size", default="method")
    pipeline.add_argument("--epochs", type=int, default=100)
    pipeline.add_argument("--batch-size", type=int, default=8)
    pipeline.add_argument("--lr", type=float, default=1e-4)
    pipeline.set_defaults(func=cmd_pipeline)

    demo = sub.add_parser("demo", help="the main job: stack, DVC data, pipeline, registry")
    demo.add_argument("--epochs", type=int, default=20)
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    from components.data_version import DataVersionError
    from components.registry import MlflowException
    from components.settings import SettingsError
    from components.stack import StackError
    from components.storage import StorageError
    from components.tracking import TrackingError

    return core_cli.main(
        argv,
        parser=core_cli.build_parser(add_commands),
        user_errors=(
            StackError,
            StorageError,
            SettingsError,
            TrackingError,
            DataVersionError,
            MlflowException,
            SubmitError,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
