"""`broker deploy ecs`: AWS CLI inputs for a GPU worker service on ECS (EC2 capacity: Fargate has no GPUs).

Each file is the ``--cli-input-json`` of one AWS API call, in the API's own shape (botocore's service
models: ecs 2014-11-13 ``RegisterTaskDefinition`` / ``CreateService``, elbv2 2015-12-01
``CreateTargetGroup``, application-autoscaling 2016-02-06 ``RegisterScalableTarget`` /
``PutScalingPolicy``; read 2026-12-01 from botocore 1.44 and the API references at
docs.aws.amazon.com/AmazonECS/latest/APIReference/ and .../autoscaling/application/APIReference/;
validated in tests with botocore's own ``ParamValidator``):

- GPUs: ``resourceRequirements: [{type: GPU, value: "N"}]`` on the container;
- the key: ``secrets: [{name: BROKER_WORKER_API_KEY, valueFrom: <Secrets Manager or SSM ARN>}]``, read
  by the task execution role at start; never in ``environment``;
- liveness: the container ``healthCheck`` runs GET /health inside the container; readiness: the load
  balancer's target group checks /ready, so a worker still loading its engines gets no traffic;
- scaling: Application Auto Scaling target tracking on the workers' average queue depth
  (``broker_worker_queue_depth``, published to CloudWatch by the CloudWatch agent's Prometheus scrape
  of /metrics, namespace ``ECS/ContainerInsights/Prometheus``), between min and max tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.deploy.fleet import (
    API_KEY_ENV,
    AVATARS_DIR,
    HEALTH_PATH,
    PORT,
    QUEUE_DEPTH_METRIC,
    READY_PATH,
    Bundle,
    FleetOptions,
)
from broker.errors import InvalidRequest

#: where the CloudWatch agent's Prometheus scrape puts ECS task metrics
METRIC_NAMESPACE = "ECS/ContainerInsights/Prometheus"
_HEALTH_CMD = ("python -c \"import urllib.request; "
               f"urllib.request.urlopen('http://127.0.0.1:{PORT}{HEALTH_PATH}', timeout=4)\"")


@dataclass
class ECSOptions(FleetOptions):
    cluster: str = "broker"
    region: str = "us-east-1"
    #: the task execution role (pulls the image, reads the secret, writes logs)
    execution_role_arn: str = "arn:aws:iam::123456789012:role/ecsTaskExecutionRole"
    #: Secrets Manager secret (or SSM parameter) ARN holding the key; replaces ``api_key_secret``
    secret_arn: str = "arn:aws:secretsmanager:us-east-1:123456789012:secret:broker-worker-api-key"
    vpc_id: str = "vpc-0123456789abcdef0"
    subnets: list[str] = field(default_factory=lambda: ["subnet-0123456789abcdef0"])
    security_groups: list[str] = field(default_factory=lambda: ["sg-0123456789abcdef0"])
    #: the target group made from target-group.json (its ARN is known once created)
    target_group_arn: str = ("arn:aws:elasticloadbalancing:us-east-1:123456789012:"
                             "targetgroup/broker-worker/0123456789abcdef")
    log_group: str = "/ecs/broker-worker"

    def check(self) -> None:
        super().check()
        arn = self.secret_arn
        if not arn.startswith("arn:") or (":secretsmanager:" not in arn and ":ssm:" not in arn):
            raise InvalidRequest("secret_arn", "must be a Secrets Manager secret or SSM parameter ARN")
        if not self.subnets:
            raise InvalidRequest("subnets", "give at least one subnet for the tasks")


def task_definition(opts: ECSOptions) -> dict[str, Any]:
    worker: dict[str, Any] = {
        "name": "worker",
        "image": opts.image,
        "essential": True,
        "command": opts.serve_args(),  # appended to the image's ENTRYPOINT, replacing its CMD
        "portMappings": [{"containerPort": PORT, "protocol": "tcp", "name": "http"}],
        "environment": [{"name": k, "value": v} for k, v in opts.plain_env().items()],
        "secrets": [{"name": API_KEY_ENV, "valueFrom": opts.secret_arn}],
        "healthCheck": {"command": ["CMD-SHELL", _HEALTH_CMD], "interval": 30, "timeout": 5, "retries": 3,
                        "startPeriod": 180},
        "stopTimeout": 120,
        "logConfiguration": {"logDriver": "awslogs", "options": {
            "awslogs-group": opts.log_group, "awslogs-region": opts.region, "awslogs-stream-prefix": opts.name,
            "awslogs-create-group": "true"}},
    }
    if opts.gpus:
        worker["resourceRequirements"] = [{"type": "GPU", "value": str(opts.gpus)}]
    task: dict[str, Any] = {
        "family": opts.name,
        "requiresCompatibilities": ["EC2"],
        "networkMode": "awsvpc",
        "executionRoleArn": opts.execution_role_arn,
        "cpu": str(int(opts.cpu * 1024)),
        "memory": str(int(opts.memory_gib * 1024)),
        "containerDefinitions": [worker],
        "tags": [{"key": k, "value": v} for k, v in opts.all_labels().items()],
    }
    if opts.avatars:
        worker["mountPoints"] = [{"sourceVolume": "avatars", "containerPath": AVATARS_DIR, "readOnly": True}]
        if opts.avatars.startswith("fs-"):
            volume: dict[str, Any] = {"name": "avatars", "efsVolumeConfiguration": {
                "fileSystemId": opts.avatars, "rootDirectory": "/", "transitEncryption": "ENABLED"}}
        else:  # a folder on the GPU instances (baked into the AMI or synced by user data)
            volume = {"name": "avatars", "host": {"sourcePath": opts.avatars}}
        task["volumes"] = [volume]
    return task


def target_group(opts: ECSOptions) -> dict[str, Any]:
    return {
        "Name": opts.name[:32],
        "Protocol": "HTTP",
        "Port": PORT,
        "VpcId": opts.vpc_id,
        "TargetType": "ip",
        "HealthCheckProtocol": "HTTP",
        "HealthCheckPath": READY_PATH,
        "HealthCheckIntervalSeconds": 10,
        "HealthCheckTimeoutSeconds": 5,
        "HealthyThresholdCount": 2,
        "UnhealthyThresholdCount": 3,
        "Matcher": {"HttpCode": "200"},
    }


def service(opts: ECSOptions) -> dict[str, Any]:
    return {
        "cluster": opts.cluster,
        "serviceName": opts.name,
        "taskDefinition": opts.name,
        "desiredCount": opts.min_replicas,
        "launchType": "EC2",
        "networkConfiguration": {"awsvpcConfiguration": {"subnets": list(opts.subnets),
                                                         "securityGroups": list(opts.security_groups)}},
        "loadBalancers": [{"targetGroupArn": opts.target_group_arn, "containerName": "worker",
                           "containerPort": PORT}],
        # Engines load before /ready turns 200: the load balancer's verdict waits that long.
        "healthCheckGracePeriodSeconds": 300,
        "deploymentConfiguration": {"minimumHealthyPercent": 100, "maximumPercent": 200,
                                    "deploymentCircuitBreaker": {"enable": True, "rollback": True}},
        "propagateTags": "TASK_DEFINITION",
        "enableExecuteCommand": False,
    }


def _resource_id(opts: ECSOptions) -> str:
    return f"service/{opts.cluster}/{opts.name}"


def scalable_target(opts: ECSOptions) -> dict[str, Any]:
    return {"ServiceNamespace": "ecs", "ResourceId": _resource_id(opts),
            "ScalableDimension": "ecs:service:DesiredCount",
            "MinCapacity": opts.min_replicas, "MaxCapacity": opts.max_replicas}


def scaling_policy(opts: ECSOptions) -> dict[str, Any]:
    return {
        "PolicyName": f"{opts.name}-queue-depth",
        "ServiceNamespace": "ecs",
        "ResourceId": _resource_id(opts),
        "ScalableDimension": "ecs:service:DesiredCount",
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(opts.target_queue_depth),
            "CustomizedMetricSpecification": {
                "MetricName": QUEUE_DEPTH_METRIC,
                "Namespace": METRIC_NAMESPACE,
                "Dimensions": [{"Name": "ClusterName", "Value": opts.cluster},
                               {"Name": "TaskDefinitionFamily", "Value": opts.name}],
                "Statistic": "Average",
            },
            "ScaleOutCooldown": 60,
            "ScaleInCooldown": 300,
            "DisableScaleIn": False,
        },
    }


#: the AWS documentation's example account, which the defaults use: left in, the calls fail
_EXAMPLE_MARKERS = ("123456789012", "0123456789abcdef")


def placeholders_left(opts: ECSOptions) -> list[str]:
    """The options still at their documentation-example defaults."""
    values = {"--secret-arn": opts.secret_arn, "--execution-role-arn": opts.execution_role_arn,
              "--vpc-id": opts.vpc_id, "--subnet": " ".join(opts.subnets),
              "--security-group": " ".join(opts.security_groups), "--target-group-arn": opts.target_group_arn}
    return [flag for flag, value in values.items() if any(m in value for m in _EXAMPLE_MARKERS)]


def bundle(opts: ECSOptions) -> Bundle:
    opts.check()
    region = f" --region {opts.region}"
    left = placeholders_left(opts)
    return Bundle(
        platform="ecs",
        files={"task-definition.json": task_definition(opts), "target-group.json": target_group(opts),
               "service.json": service(opts), "scalable-target.json": scalable_target(opts),
               "scaling-policy.json": scaling_policy(opts)},
        commands=[
            f"aws secretsmanager create-secret{region} --name {opts.api_key_secret} "
            f'--secret-string "${API_KEY_ENV}"   # once; its ARN is --secret-arn',
            f"aws elbv2 create-target-group{region} --cli-input-json file://target-group.json"
            "   # its ARN is --target-group-arn",
            f"aws ecs register-task-definition{region} --cli-input-json file://task-definition.json",
            f"aws ecs create-service{region} --cli-input-json file://service.json",
            f"aws application-autoscaling register-scalable-target{region} "
            "--cli-input-json file://scalable-target.json",
            f"aws application-autoscaling put-scaling-policy{region} --cli-input-json file://scaling-policy.json",
        ],
        notes=[*([f"still AWS documentation examples, give your own: {', '.join(left)}"] if left else []),
               "GPU tasks need EC2 capacity (an ECS GPU-optimized AMI in the cluster's capacity provider)",
               f"scaling reads {QUEUE_DEPTH_METRIC} from CloudWatch: run the CloudWatch agent with a Prometheus "
               "scrape of /metrics (docs/SELF_HOSTED.md)"],
    )


__all__ = ["METRIC_NAMESPACE", "ECSOptions", "bundle", "scalable_target", "scaling_policy", "service",
           "target_group", "task_definition"]
