"""The tenants file README shows is one `batchserve tenants add --plan` accepts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from serve.gateway.tenants import hash_token, load_document, parse_tenants_document
from serve.tenants_cli import add_token

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_tenants_file_takes_a_tenant_on_its_plan(tmp_path: Path) -> None:
    (block,) = [
        b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "plans:" in b
    ]
    path = tmp_path / "tenants.yaml"
    path.write_text(block)
    (plan_name,) = yaml.safe_load(block)["plans"]
    token = add_token(path, tenant_id="acme", accounts=["acme-prod"], plan=plan_name)
    grant = parse_tenants_document(load_document(path))[hash_token(token)]
    assert grant.tenant.plan.name == plan_name
    assert grant.tenant.accounts == frozenset({"acme-prod"})
    assert grant.tenant.plan.requests_per_minute is not None
