"""`broker deploy <provider>`: one sub-command per provider, each in its own module."""

from __future__ import annotations

import importlib

import typer

deploy_app = typer.Typer(help="Deploy the broker worker to a provider, or write manifests for your own GPU fleet.",
                         no_args_is_help=True)

_PROVIDER_MODULES = ("broker.cli.deploy_runpod", "broker.cli.deploy_modal", "broker.cli.deploy_replicate",
                     "broker.cli.deploy_selfhosted")


def register(app: typer.Typer) -> None:
    for name in _PROVIDER_MODULES:
        importlib.import_module(name).register(deploy_app)
    app.add_typer(deploy_app, name="deploy")
