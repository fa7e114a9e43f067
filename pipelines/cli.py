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
from fod_core.calibration import LevelWeighting

LEVEL_WEIGHTINGS = [w.value for w in LevelWeighting]
LW_HELP = (
    "how the levels' maps combine: equal (the method, default) or synthetic (weights chosen "
    "on anomalies planted into validation images)"
)


def cmd_stack(args: argparse.Namespace) -> int:
    from components.stack import EmbeddedStack

    if args.action == "bucket":
        from components.settings import load_settings
        from components.storage import ensure_bucket

        settings = load_settings(args.home)
        created = ensure_bucket(settings)
        where = settings.s3_endpoint or "AWS S3"
        print(f"bucket {settings.bucket} {'created' if created else 'exists'} at {where}")
        return 0
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
    if args.deploy is None:
        args.deploy = "local" if args.action == "run" else "kserve"
    from components.data_version import read_data_version, remote_url
    from components.settings import load_settings
    from components.tracking import code_version

    settings = load_settings()
    arguments = {
        "dvc_remote": args.dvc_remote or remote_url(settings),
        "data_version": args.data_version or read_data_version(args.dvc_file).md5,
        "categories": args.categories,
        "code_version": code_version(),
        **_training_arguments(args),
        "canary_traffic_percent": args.canary_percent,
    }
    return {key: value for key, value in arguments.items() if value is not None}


def _training_arguments(args: argparse.Namespace) -> dict:
    """Pipeline parameters that `fod pipeline` and `fod retrain` take the same way."""
    return {
        "data_format": args.format,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "model_size": args.model_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "level_weights": args.level_weights,
        "deploy_target": args.deploy,
        # None: the pipeline's default
        "val_fraction": args.val_fraction,
        "min_val_images": args.min_val_images,
        "require_masks": args.require_masks,
        "min_image_auroc": args.min_image_auroc,
        "min_planted_image_auroc": args.min_planted_image_auroc,
    }


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines.training import COMPILED_YAML, SubmitError, compile_pipeline, run_local, submit

    if args.action == "compile":
        print(compile_pipeline(args.out or COMPILED_YAML))
        return 0
    if args.action == "run":
        import os

        from components.settings import fod_home, load_settings

        load_settings().export()
        os.environ.setdefault("FOD_HOME", str(fod_home()))  # where the deploy step keeps state
        result = run_local(_pipeline_arguments(args), args.pipeline_root)
        print(f"pipeline finished; outputs under {result.pipeline_root}")
        return 0
    # submit
    if not args.host:
        raise SubmitError("`fod pipeline submit` needs --host URL of a KFP endpoint")
    run_id = submit(_pipeline_arguments(args), args.host, experiment=args.experiment)
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoSettings, run_demo

    summary = run_demo(".", demo=DemoSettings(epochs=args.epochs))
    print("\nFOD main job done")
    print(f"  MLflow UI          {summary['mlflow_ui']}")
    print(
        f"  registered model   {summary['registered_model']} "
        f"v{summary['champion_version']} (alias champion; latest v{summary['latest_version']})"
    )
    print(f"  metrics            {summary['champion_metrics']}")
    print(f"  data version       {summary['data_version']}")
    if summary["serving_url"]:
        print(f"  model server       {summary['serving_url']} (KServe v1/v2 REST, gRPC)")
        for item in summary["served"]:
            print(
                f"    {item['image']:40s} score {item['score']:.4g}  "
                f"anomalous={item['is_anomalous']}  (served v{item['model_version']})"
            )
    print(f"  wall time          {summary['seconds']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from components.serving import serve_from_args

    serve_from_args(args)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from components.deployment import (
        DeploymentError,
        DeployTarget,
        LocalServing,
        deploy_champion,
        inference_service,
    )
    from components.registry import CHAMPION
    from components.tracking import registered_name

    if args.action == "render":
        import yaml

        if not (args.storage_uri and args.model_version):
            raise DeploymentError("`fod deploy render` needs --storage-uri and --model-version")
        manifest = inference_service(
            registered_name(args.category),
            storage_uri=args.storage_uri,
            model_version=args.model_version,
            namespace=args.namespace,
            canary_traffic_percent=args.canary_percent,
            **({"image": args.image} if args.image else {}),
        )
        text = yaml.safe_dump(manifest, sort_keys=False)
        if args.out:
            args.out.write_text(text)
        else:
            print(text, end="")
        return 0
    serving = LocalServing()
    if args.action == "status":
        for server in serving.servers():
            print(json.dumps({"name": server.name, "url": server.url, "status": server.status()}))
        return 0
    if args.action == "stop":
        names = (
            [registered_name(args.category)]
            if args.category
            else [s.name for s in serving.servers()]
        )
        for name in names:
            serving.stop(name)
            print(f"stopped {name}")
        return 0
    from mlflow import MlflowClient

    from components.settings import load_settings
    from components.tracking import registered_name

    settings = load_settings()
    settings.export()
    name = registered_name(args.category)
    client = MlflowClient()
    version = args.model_version or client.get_model_version_by_alias(name, CHAMPION).version
    result = deploy_champion(
        name,
        version,
        DeployTarget(args.action),
        namespace=args.namespace,
        canary_traffic_percent=args.canary_percent,
        env=settings.env(),
    )
    print(json.dumps(result))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from functools import partial

    from pipelines.retrain import parse_duration, retrain_every, retrain_once

    overrides = {
        key: value
        for key, value in {
            **_training_arguments(args),
            "warm_start": args.warm_start or None,
        }.items()
        if value is not None
    }
    if args.preset == "demo":
        from pipelines.demo import DemoSettings

        overrides = DemoSettings().training_arguments() | overrides
    check = partial(
        retrain_once,
        args.categories,
        dvc_file=args.dvc_file,
        track=args.track,
        pipeline_root=args.pipeline_root,
        arguments=overrides,
        kfp_host=args.kfp_host,
    )
    if args.every is None:
        print(json.dumps(check(), indent=2))
        return 0
    for outcome in retrain_every(parse_duration(args.every), check, max_checks=args.max_checks):
        print(json.dumps(outcome), flush=True)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.schedule import COMPILED_YAML, compile_check, create_recurring_run
    from pipelines.training import SubmitError

    if args.action == "compile":
        print(compile_check(args.out or COMPILED_YAML))
        return 0
    if not args.host:
        raise SubmitError("`fod schedule create` needs --host URL of a KFP endpoint")
    run_id = create_recurring_run(args.host, args.spec)
    print(f"created recurring run {run_id} on {args.host}")
    return 0


def _add_data_rules(parser: argparse.ArgumentParser) -> None:
    """Splits, data rules and gates that `fod pipeline` and `fod retrain` take the same way
    (unset: the pipeline's defaults)."""
    parser.add_argument(
        "--val-fraction", type=float, help="share of the normal images held out for validation"
    )
    parser.add_argument(
        "--min-val-images", type=int, help="fail early with fewer validation normals (5)"
    )
    parser.add_argument(
        "--require-masks",
        action="store_true",
        default=None,
        help="fail validation when a defect image has no mask (pixel metrics need them)",
    )
    parser.add_argument(
        "--min-image-auroc", type=float, help="gate on labelled defects (default 0.9)"
    )
    parser.add_argument(
        "--min-planted-image-auroc",
        type=float,
        help="gate without labelled defects: image AUROC on planted anomalies (default 0.5)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    from components.serving import add_serve_arguments

    stack = sub.add_parser("stack", help="the embedded S3 (SeaweedFS) + MLflow on 127.0.0.1")
    stack.add_argument(
        "action",
        choices=["up", "down", "status", "bucket"],
        help="bucket: create FOD_BUCKET on the configured S3 if missing (a cluster's first start)",
    )
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
    pipeline.add_argument(
        "--level-weights", default="equal", choices=LEVEL_WEIGHTINGS, help=LW_HELP
    )
    _add_data_rules(pipeline)
    pipeline.add_argument(
        "--deploy",
        choices=["local", "kserve", "none"],
        help="serve the champion: local model server (default for run), InferenceService "
        "(default for submit) or none",
    )
    pipeline.add_argument(
        "--canary-percent", type=int, default=0, help="kserve: traffic share of a new version"
    )
    pipeline.set_defaults(func=cmd_pipeline)

    serve = sub.add_parser("serve", help="KServe model server (v1, v2 REST and gRPC) on 127.0.0.1")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    deploy = sub.add_parser(
        "deploy", help="serve the champion locally or as a KServe InferenceService"
    )
    deploy.add_argument("action", choices=["local", "kserve", "render", "status", "stop"])
    deploy.add_argument("--category", default="widget")
    deploy.add_argument("--model-version", help="default: the current champion")
    deploy.add_argument("--storage-uri", help="render: the model's S3 location")
    deploy.add_argument("--namespace", default="fod")
    deploy.add_argument("--canary-percent", type=int, help="kserve: new version's traffic share")
    deploy.add_argument("--image", help="render: the serving image")
    deploy.add_argument("--out", type=Path, help="render: write the YAML here")
    deploy.set_defaults(func=cmd_deploy)

    retrain = sub.add_parser(
        "retrain", help="retrain when the data version changed; promote only through the gates"
    )
    retrain.add_argument("--categories", nargs="+", default=["widget"])
    retrain.add_argument("--dvc-file", type=Path, default=Path("data.dvc"))
    retrain.add_argument(
        "--track", type=Path, help="data folder to `dvc add` and push first (new images in it)"
    )
    retrain.add_argument("--every", help="check on a schedule: 90s, 15m, 1h, 1d")
    retrain.add_argument("--max-checks", type=int, help="with --every: stop after N checks")
    retrain.add_argument("--pipeline-root", type=Path, default=Path("runs/pipeline"))
    retrain.add_argument(
        "--preset", choices=["demo"], help="the main job's small training settings"
    )
    retrain.add_argument("--warm-start", action="store_true", help="start from the champion")
    retrain.add_argument("--format")
    retrain.add_argument("--backbone")
    retrain.add_argument("--image-size", type=int)
    retrain.add_argument("--model-size")
    retrain.add_argument("--epochs", type=int)
    retrain.add_argument("--batch-size", type=int)
    retrain.add_argument("--lr", type=float)
    retrain.add_argument("--level-weights", choices=LEVEL_WEIGHTINGS, help=LW_HELP)
    _add_data_rules(retrain)
    retrain.add_argument("--deploy", choices=["local", "kserve", "none"])
    retrain.add_argument(
        "--kfp-host", help="submit the pipeline to this KFP endpoint and wait (in a cluster)"
    )
    retrain.set_defaults(func=cmd_retrain)

    schedule = sub.add_parser(
        "schedule", help="the retrain check as a KFP recurring run (spec: infra/kfp)"
    )
    schedule.add_argument("action", choices=["create", "compile"])
    schedule.add_argument("--host", help="KFP endpoint")
    schedule.add_argument("--spec", type=Path, default=Path("infra/kfp/recurring-run.yaml"))
    schedule.add_argument("--out", type=Path, help="compile: the YAML path")
    schedule.set_defaults(func=cmd_schedule)

    demo = sub.add_parser("demo", help="the main job: stack, DVC data, pipeline, registry")
    demo.add_argument("--epochs", type=int, default=20)
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    from components.data_version import DataVersionError
    from components.deployment import DeploymentError
    from components.registry import MlflowException
    from components.serving import ServingError
    from components.settings import SettingsError
    from components.stack import StackError
    from components.storage import StorageError
    from components.tracking import TrackingError
    from pipelines.retrain import RetrainBusy
    from pipelines.training import SubmitError

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
            ServingError,
            DeploymentError,
            RetrainBusy,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
