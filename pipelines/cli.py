"""The ``fod`` command: ``fod_core``'s commands plus the stack, the pipeline and the main job.

fod stack up|down|status             the embedded S3 + MLflow on 127.0.0.1
fod pipeline compile|run|submit      the KFP training pipeline
fod demo                             the main job (stack, DVC data, pipeline, registry)
fod monitor                          served decisions against the calibration: drift
fod review                           the operator review page: verdicts, the next data version
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fod_core import cli as core_cli
from fod_core.config import Precision


def cmd_stack(args: argparse.Namespace) -> int:
    from components.local.stack import EmbeddedStack

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
    from components.data_version import read_data_version
    from pipelines.parameters import from_arguments, run_arguments

    overrides = from_arguments(args)
    overrides.setdefault("deploy_target", "local" if args.action == "run" else "kserve")
    return run_arguments(
        data_version=args.data_version or read_data_version(args.dvc_file).md5,
        categories=args.categories,
        dvc_remote=args.dvc_remote,
        overrides=overrides,
    )


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines.dag import COMPILED_YAML, compile_pipeline
    from pipelines.runner import SubmitError, run_local, submit

    if args.action == "compile":
        print(compile_pipeline(args.out or COMPILED_YAML))
        return 0
    if args.action == "run":
        import os

        from components.settings import fod_home, load_settings

        load_settings().export()
        os.environ.setdefault("FOD_HOME", str(fod_home()))  # where the deploy step keeps state
        result = run_local(_pipeline_arguments(args), args.pipeline_root, verbose=args.verbose)
        print(f"pipeline finished; outputs under {result.pipeline_root}")
        print(f"raw logs: {result.log_path}")
        return 0
    # submit
    if not args.host:
        raise SubmitError("`fod pipeline submit` needs --host URL of a KFP endpoint")
    use_kfp_identity(args)
    run_id = submit(_pipeline_arguments(args), args.host, experiment=args.experiment)
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoSettings, run_demo

    summary = run_demo(".", demo=DemoSettings(epochs=args.epochs), verbose=args.verbose)
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
    from components.serving.server import serve_from_args

    serve_from_args(args)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from components.deploy import DeployTarget, deploy_champion, inference_service
    from components.errors import DeploymentError
    from components.local.servers import LocalServing
    from components.registry import CHAMPION
    from components.settings import shipped_record
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
            decision_record=None
            if args.decision_record == "none"
            else args.decision_record or shipped_record(),
            runtime=args.runtime,
            precision=args.precision,
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
        runtime=args.runtime,
        precision=args.precision,
    )
    print(json.dumps(result))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from functools import partial

    from pipelines.parameters import from_arguments
    from pipelines.retrain import parse_duration, retrain_every, retrain_once

    use_kfp_identity(args)
    overrides = from_arguments(args)
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
        verbose=args.verbose,
    )
    if args.on_drift:
        from pipelines.retrain import retrain_on_drift

        since = parse_duration(args.drift_window)
        check = partial(retrain_on_drift, args.categories, check, since_seconds=since)
    if args.every is None:
        print(json.dumps(check(), indent=2))
        return 0
    for outcome in retrain_every(parse_duration(args.every), check, max_checks=args.max_checks):
        print(json.dumps(outcome), flush=True)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from components.monitoring import monitor, print_report
    from pipelines.retrain import parse_duration

    report = monitor(
        args.category,
        since_seconds=parse_duration(args.since) if args.since else None,
        record=args.record,
        model_dir=args.model,
        plot=args.plot,
        track=not args.no_track,
    )
    print_report(report)
    return 3 if report["drift"] else 0


def cmd_review(args: argparse.Namespace) -> int:
    from components.local.servers import LocalServing
    from components.review import serve_review
    from components.settings import load_settings, shipped_record
    from components.tracking import registered_name

    settings = load_settings()
    settings.export()  # publishing pushes to the stack's DVC remote
    if args.pull:  # the folder must hold the whole current version before anything is added
        from components.data_version import DvcRepo

        repo = DvcRepo(args.repo)
        repo.ensure(settings)
        repo.run("pull", "--quiet", f"{args.data.resolve()}.dvc")
    record = args.record or LocalServing().records_file(registered_name(args.category))
    serve_review(
        args.category,
        record=record,
        data_dir=args.data,
        repo_root=args.repo,
        port=args.port,
        import_from=args.import_from or shipped_record(),
        import_interval=args.import_interval,
        git_push=args.git_push,
    )
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipelines.runner import SubmitError
    from pipelines.schedule import COMPILED_YAML, compile_check, create_recurring_run

    if args.action == "compile":
        print(compile_check(args.out or COMPILED_YAML))
        return 0
    if not args.host:
        raise SubmitError("`fod schedule create` needs --host URL of a KFP endpoint")
    use_kfp_identity(args)
    run_id = create_recurring_run(args.host, args.spec)
    print(f"created recurring run {run_id} on {args.host}")
    return 0


def add_kfp_identity_arguments(parser: argparse.ArgumentParser) -> None:
    """A person's identity for a multi-user KFP, from files (never a secret in argv)."""
    parser.add_argument(
        "--kfp-token-file",
        type=Path,
        help="multi-user KFP: a bearer token, read again at each request (`kubectl create "
        "token <account> -n <profile> --audience pipelines.kubeflow.org`); in a pod, the "
        "projected token at KF_PIPELINES_SA_TOKEN_PATH is used without this; or FOD_KFP_TOKEN",
    )
    parser.add_argument(
        "--kfp-cookie-file",
        type=Path,
        help="multi-user KFP behind the Kubeflow dashboard's login: a file with the session "
        "cookie (name=value, as the browser holds it); or FOD_KFP_COOKIE",
    )


def use_kfp_identity(args: argparse.Namespace) -> None:
    """The identity files given on the command line, where ``kfp_credentials`` reads them."""
    import os

    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV

    from pipelines.runner import COOKIE_ENV, SubmitError

    for path in (args.kfp_token_file, args.kfp_cookie_file):
        if path is not None and not path.is_file():
            raise SubmitError(f"{path} does not exist")
    if args.kfp_token_file is not None:
        os.environ[KF_PIPELINES_SA_TOKEN_ENV] = str(args.kfp_token_file.resolve())
    if args.kfp_cookie_file is not None:
        os.environ[COOKIE_ENV] = args.kfp_cookie_file.read_text().strip()


class CategoriesAction(argparse.Action):
    """``--categories a b``, ``"a b"`` or ``a,b``: one list. A Kubernetes manifest's
    ``$(FOD_CATEGORIES)`` reaches the command as one argument (Kubernetes substitutes it,
    it never splits words), so names are split here on spaces and commas."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import re

        names = [name for value in values for name in re.split(r"[\s,]+", value) if name]
        if not names:
            parser.error(f"{option_string} needs at least one category name")
        setattr(namespace, self.dest, list(dict.fromkeys(names)))


def add_commands(sub: argparse._SubParsersAction) -> None:
    from components.deploy import DEFAULT_NAMESPACE
    from components.serving.server import add_serve_arguments
    from pipelines.parameters import DEFAULT_CATEGORIES
    from pipelines.parameters import add_arguments as add_parameter_arguments

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
    pipeline.add_argument(
        "--categories", nargs="+", action=CategoriesAction, default=list(DEFAULT_CATEGORIES)
    )
    add_parameter_arguments(pipeline)
    add_kfp_identity_arguments(pipeline)
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
    deploy.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    deploy.add_argument("--canary-percent", type=int, help="kserve: new version's traffic share")
    deploy.add_argument("--image", help="render: the serving image")
    deploy.add_argument(
        "--decision-record",
        help="render: S3 location the pod ships its decisions to (default: "
        "FOD_DECISION_RECORD; none: off)",
    )
    deploy.add_argument("--out", type=Path, help="render: write the YAML here")
    deploy.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "onnx", "openvino"],
        help="what the server scores with: PyTorch or the version's checked export",
    )
    deploy.add_argument(
        "--precision",
        default="fp32",
        choices=[p.value for p in Precision],
        help="torch: fp32, bf16, or auto (bf16 where the server's CPU or GPU has it natively "
        "and the version passed its bf16 check)",
    )
    deploy.set_defaults(func=cmd_deploy)

    retrain = sub.add_parser(
        "retrain", help="retrain when the data version changed; promote only through the gates"
    )
    retrain.add_argument(
        "--categories", nargs="+", action=CategoriesAction, default=list(DEFAULT_CATEGORIES)
    )
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
    add_parameter_arguments(retrain)
    retrain.add_argument(
        "--kfp-host", help="submit the pipeline to this KFP endpoint and wait (in a cluster)"
    )
    retrain.add_argument(
        "--on-drift",
        action="store_true",
        help="run the check only when fod monitor finds drift in a category",
    )
    retrain.add_argument("--drift-window", default="24h", help="with --on-drift: decisions since")
    add_kfp_identity_arguments(retrain)
    retrain.set_defaults(func=cmd_retrain)

    monitor = sub.add_parser(
        "monitor",
        help="served decisions against the model's calibration: drift verdict (exit 3 on drift)",
    )
    monitor.add_argument("--category", default=DEFAULT_CATEGORIES[0])
    monitor.add_argument("--since", help="only decisions this recent: 90m, 24h, 7d")
    monitor.add_argument(
        "--record",
        help="the decision record: an SQLite file or s3://bucket/prefix where servers ship it "
        "(default: FOD_DECISION_RECORD, else the local server's)",
    )
    monitor.add_argument(
        "--model", type=Path, help="compare with this model's calibration (default: the registry)"
    )
    monitor.add_argument("--plot", type=Path, help="write the score and alarm-rate picture here")
    monitor.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    monitor.set_defaults(func=cmd_monitor)

    review = sub.add_parser(
        "review", help="the operator review page on 127.0.0.1: verdicts on flagged parts"
    )
    review.add_argument("--category", default=DEFAULT_CATEGORIES[0])
    review.add_argument(
        "--record", type=Path, help="the decision record (default: the local server's)"
    )
    review.add_argument("--data", type=Path, default=Path("data"), help="the DVC-tracked folder")
    review.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository root")
    review.add_argument("--port", type=int, default=8090)
    review.add_argument(
        "--import-from",
        help="S3 location the model servers ship decisions to (default: FOD_DECISION_RECORD); "
        "new ones are copied into --record",
    )
    review.add_argument(
        "--import-interval", type=float, default=30.0, help="seconds between imports"
    )
    review.add_argument(
        "--pull",
        action="store_true",
        help="first fetch the data of the checkout's data version (dvc pull): a fresh checkout",
    )
    review.add_argument(
        "--git-push",
        action="store_true",
        help="commit and push the new data version's .dvc file (where a cluster's retrain "
        "check, which clones the repository, finds it)",
    )
    review.set_defaults(func=cmd_review)

    schedule = sub.add_parser(
        "schedule", help="the retrain check as a KFP recurring run (spec: infra/kfp)"
    )
    schedule.add_argument("action", choices=["create", "compile"])
    schedule.add_argument("--host", help="KFP endpoint")
    schedule.add_argument("--spec", type=Path, default=Path("infra/kfp/recurring-run.yaml"))
    schedule.add_argument("--out", type=Path, help="compile: the YAML path")
    add_kfp_identity_arguments(schedule)
    schedule.set_defaults(func=cmd_schedule)

    demo = sub.add_parser("demo", help="the main job: stack, DVC data, pipeline, registry")
    demo.add_argument("--epochs", type=int, default=20)
    demo.set_defaults(func=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    from components.data_version import DataVersionError
    from components.errors import DeploymentError, ServingError, StackError
    from components.monitoring import MonitorError
    from components.preflight import ServiceDown
    from components.registry import MlflowException
    from components.settings import SettingsError
    from components.storage import StorageError
    from components.tracking import TrackingError
    from pipelines.retrain import RetrainBusy
    from pipelines.runner import SubmitError

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
            MonitorError,
            ServiceDown,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
