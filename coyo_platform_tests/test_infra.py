"""infra/: the CloudFormation template lints clean, passes checkov, deploys into a real (loopback)
AWS API, and the aws deployment's resources point at what it created; dagster.yaml is valid
instance config; the images run what the task definitions say."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import boto3
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "infra" / "coyo-platform.yaml"
TOOLS = REPO / ".venv-tools" / "bin"


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) kept as plain values."""


def _tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}


_CfnLoader.add_multi_constructor("!", _tag)


def template() -> dict:
    return yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)


def _tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{path} missing: `make test` installs cfn-lint and checkov there"
    return str(path)


def test_cfn_lint_is_clean():
    done = subprocess.run([_tool("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_checkov_fails_no_check_and_every_skip_says_why():
    done = subprocess.run(
        [
            _tool("checkov"),
            "-f",
            str(TEMPLATE),
            "--framework",
            "cloudformation",
            "--skip-download",
            "--output",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    report = json.loads(done.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']}" for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0, failed
    assert summary["passed"] > 50
    for name, resource in template()["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert len(skip.get("comment", "")) > 20, f"{name}: skip {skip['id']} needs a reason"


@pytest.fixture
def stack(s3_bucket, monkeypatch):
    """The template deployed into moto's server (it accepts S3/ECS/IAM/Logs/RDS resources; ECS
    capacity providers are skipped by moto and keep their logical names)."""
    ec2 = boto3.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=f"us-east-1{z}")[
            "Subnet"
        ]["SubnetId"]
        for i, z in ((1, "a"), (2, "b"))
    ]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ssm = boto3.client("ssm")
    for name in ("/coyo-test/gpu-ami", "/coyo-test/cpu-ami"):
        ssm.put_parameter(Name=name, Value=ami, Type="String", Overwrite=True)
    cf = boto3.client("cloudformation")
    name = f"coyo-{s3_bucket[-8:]}"
    cf.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[
            {"ParameterKey": "VpcId", "ParameterValue": vpc},
            {"ParameterKey": "SubnetIds", "ParameterValue": ",".join(subnets)},
            {"ParameterKey": "GpuAmiId", "ParameterValue": "/coyo-test/gpu-ami"},
            {"ParameterKey": "CpuAmiId", "ParameterValue": "/coyo-test/cpu-ami"},
            {"ParameterKey": "ImageTag", "ParameterValue": "v1"},
            {"ParameterKey": "UiAccessCidr", "ParameterValue": "10.8.0.0/16"},
            {"ParameterKey": "DagsterServiceCount", "ParameterValue": "1"},
        ],
        Capabilities=["CAPABILITY_IAM"],
    )
    [description] = cf.describe_stacks(StackName=name)["Stacks"]
    assert description["StackStatus"] == "CREATE_COMPLETE", description.get("StackStatusReason")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in description["Outputs"]}
    return name, outputs, subnets


def test_stack_deploys_and_the_aws_deployment_points_at_it(stack, monkeypatch):
    name, outputs, subnets = stack
    ecs, s3 = boto3.client("ecs"), boto3.client("s3")

    # the bucket is there and encrypted with the stack's key (moto applies encryption; it does
    # not apply public-access blocks or lifecycle rules, which the template test below checks)
    bucket = outputs["DataBucket"]
    rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"

    # the label task: GPU, on the programs image, awslogs, the label program's entrypoint
    label = ecs.describe_task_definition(taskDefinition=outputs["LabelTaskDefinition"])
    [container] = label["taskDefinition"]["containerDefinitions"]
    assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert container["entryPoint"] == ["python", "-m", "coyo_platform.label"]
    assert container["image"].endswith(outputs["ProgramsRepository"].split("/", 1)[1] + ":v1")

    # the Dagster service's environment is what definitions.aws_resources() reads
    dagster_task = ecs.describe_task_definition(taskDefinition=outputs["DagsterTaskDefinition"])
    env = {
        e["name"]: e.get("value", "")
        for e in dagster_task["taskDefinition"]["containerDefinitions"][0]["environment"]
    }
    assert env["COYO_ENV"] == "aws"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from coyo_platform.definitions import resources_for

    resources = resources_for("aws")
    storage = resources["storage"].process_config_and_initialize()
    compute = resources["compute"].process_config_and_initialize()
    assert storage.root == outputs["DataRoot"] == f"s3://{bucket}/coyo"
    assert compute.cluster == outputs["Cluster"]
    assert compute.pipes_bucket == bucket
    assert compute.label_task_definition == outputs["LabelTaskDefinition"]
    assert compute.download_task_definition == outputs["DownloadTaskDefinition"]
    # moto skips ECS capacity providers (and outputs naming them): check those in the template
    variables = {
        e["Name"]: e["Value"]
        for e in template()["Resources"]["DagsterTaskDefinition"]["Properties"][
            "ContainerDefinitions"
        ][0]["Environment"]
    }
    assert variables["COYO_GPU_CAPACITY_PROVIDER"] == {"Ref": "GpuCapacityProvider"}
    assert variables["COYO_CPU_CAPACITY_PROVIDER"] == {"Ref": "CpuCapacityProvider"}
    gpu = template()["Resources"]["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert gpu["AutoScalingGroupArn"] == {"Ref": "GpuInstances"}
    assert compute.subnets.split(",") == subnets


def test_data_bucket_is_private_and_expires_temporary_objects():
    bucket = template()["Resources"]["DataBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert (
        bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
            "ServerSideEncryptionByDefault"
        ]["SSEAlgorithm"]
        == "aws:kms"
    )
    rules = {r["Id"]: r for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["expire-pipes-messages"]["Prefix"] == "dagster-pipes/"  # EcsCompute's prefix
    assert "AbortIncompleteMultipartUpload" in rules["abort-incomplete-uploads"]
    from coyo_platform.resources import EcsCompute

    assert EcsCompute.model_fields["pipes_prefix"].default == "dagster-pipes"


def test_dagster_yaml_is_valid_instance_config(tmp_path, monkeypatch):
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((REPO / "infra" / "dagster.yaml").read_text())
    for name in (
        "COYO_PIPES_BUCKET",
        "DAGSTER_PG_HOST",
        "DAGSTER_PG_DB",
        "DAGSTER_PG_USERNAME",
        "DAGSTER_PG_PASSWORD",
        "COYO_RUN_TASK_DEFINITION",
    ):
        monkeypatch.setenv(name, "x")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "EcsRunLauncher"
    # the pluggable parts' own config schemas accept their sections
    import importlib

    from dagster._config import process_config

    for section in ("run_launcher", "compute_logs"):
        cls = getattr(importlib.import_module(config[section]["module"]), config[section]["class"])
        checked = process_config(cls.config_type(), config[section]["config"])
        assert checked.success, (section, checked.errors)
    from dagster_postgres import DagsterPostgresStorage  # installed with the orchestrator extra

    checked = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert checked.success, checked.errors
    assert "postgres_db" in config["storage"]["postgres"]
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    [per_partition] = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert per_partition == {
        "key": "dagster/partition",
        "value": {"applyLimitPerUniqueValue": True},
        "limit": 1,
    }
    # every variable dagster.yaml reads is set by the template for the Dagster containers
    wanted = set(re.findall(r"\{env: (\w+)\}", (REPO / "infra" / "dagster.yaml").read_text()))
    containers = template()["Resources"]["DagsterTaskDefinition"]["Properties"][
        "ContainerDefinitions"
    ]
    for container in containers:
        given = {e["Name"] for e in container["Environment"]} | {
            s["Name"] for s in container["Secrets"]
        }
        assert wanted <= given, wanted - given


def test_images_run_what_the_task_definitions_say():
    from coyo_platform.resources import PROGRAMS

    resources = template()["Resources"]
    image_file = (REPO / "infra" / "Dockerfile.programs").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", image_file, re.M).group(1))
    label = resources["LabelTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    download = resources["DownloadTaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert label["EntryPoint"] == entry == ["python", "-m", "coyo_platform.label"]
    assert download["EntryPoint"] == ["python", "-m", "coyo_platform.download"]
    # each container is named for its program, as EcsCompute overrides it
    assert {label["Name"], download["Name"]} == set(PROGRAMS)
    for container in (label, download):
        assert PROGRAMS[container["Name"]] == container["EntryPoint"][-1]

    # the programs image installs the base package, whose requirements carry no dagster
    assert re.search(r"pip install \.\s", image_file)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [re.split(r"[=<>\[ ]", r)[0] for r in project["dependencies"]]
    assert "dagster-pipes" in base
    assert not [r for r in base if r.startswith("dagster") and r != "dagster-pipes"]
    assert "dagster" in " ".join(project["optional-dependencies"]["orchestrator"])
