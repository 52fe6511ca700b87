"""The arrows between modules run one way: launcher -> producer -> worker adapters -> service
-> store / core, with no cycle. Read from the source (every import statement, including those
inside functions), so that a lazy import cannot hide a wrong-way arrow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("appattest", "producer", "worker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a name inside a module is its module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _ring(module: str) -> str:
    if module.startswith("appattest"):
        return "launcher"
    if module.startswith("producer"):
        return "producer"
    for ring in ("core", "store", "service"):
        if module == f"worker.{ring}" or module.startswith(f"worker.{ring}."):
            return ring
    if module == "worker.contract":
        return "contract"
    return "adapters"


# What each ring may not import.
FORBIDDEN = {
    "core": {"contract", "store", "service", "adapters", "producer", "launcher"},
    "contract": {"store", "service", "adapters", "producer", "launcher"},
    "store": {"service", "adapters", "producer", "launcher"},
    "service": {"adapters", "producer", "launcher"},
    "adapters": {"producer", "launcher"},
    "producer": {"launcher"},
    "launcher": set(),
}

# What the producer may use of the worker besides its contract, messages, settings and store.
PRODUCER_MAY_USE = {
    "worker.contract",
    "worker.settings",
    "worker.version",
    # The queue's contract: the Celery app without its tasks (queue_app), the messages and
    # their one publish path, and the ledger that publish writes first.
    "worker.queue.app",
    "worker.queue.messaging",
    "worker.queue.ledger",
    # Operating it: the structured log format and request id, the metrics of the broker's
    # queues and of the embedded worker (``appattest serve``).
    "worker.queue.logs",
    "worker.queue.metrics",
}


def test_the_walk_sees_function_level_imports() -> None:
    # worker.queue.app registers the tasks from inside create_celery_app.
    assert "worker.queue.tasks" in GRAPH["worker.queue.app"]
    assert "producer.app" in GRAPH["appattest.cli"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_point_one_way(module: str) -> None:
    ring = _ring(module)
    wrong = sorted(t for t in GRAPH[module] if _ring(t) in FORBIDDEN[ring])
    assert not wrong, f"{module} ({ring}) imports {wrong}"


def test_producer_uses_only_the_worker_contract_messaging_settings_and_store() -> None:
    for module, targets in GRAPH.items():
        if _ring(module) != "producer":
            continue
        extra = {
            t
            for t in targets
            if t.startswith("worker")
            and t not in PRODUCER_MAY_USE
            and not t.startswith("worker.store")
        }
        assert not extra, f"{module} imports {sorted(extra)}"


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components: any component of two or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_layout_shows_the_rings() -> None:
    """worker/ holds the contract, settings and version, and one package per ring or adapter
    group; no adapter module lies loose beside them."""
    worker = ROOT / "worker"
    modules = sorted(p.name for p in worker.glob("*.py"))
    assert modules == ["__init__.py", "contract.py", "settings.py", "version.py"], modules
    packages = sorted(p.name for p in worker.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["cli", "core", "queue", "service", "simulator", "store"], packages


def test_the_api_process_loads_no_verification_code() -> None:
    """Building and starting the producer's app (lifespan included) imports neither the
    workers' tasks nor the service layer nor the verifier's checks."""
    script = """
import sys
from pydantic import SecretStr
from fastapi.testclient import TestClient
from producer import create_app
from worker.settings import Settings
settings = Settings(api_keys=[SecretStr("k")], store_url="sqlite://",
                    broker_url="memory://", result_backend="cache+memory://")
with TestClient(create_app(settings)) as client:
    assert client.get("/healthz").status_code == 200
loaded = sorted(m for m in sys.modules if m.startswith(("worker.queue.tasks", "worker.service",
                "worker.core.attestation", "worker.core.assertion", "worker.core.chain")))
print(",".join(loaded))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_settings_do_not_import_the_service_layer() -> None:
    # Settings are read by every process, the producer's included: they describe the policy
    # (worker.core.PolicySpec) but never reach into the service that runs it.
    reached = set()
    todo = ["worker.settings"]
    while todo:
        module = todo.pop()
        for target in GRAPH[module]:
            if target not in reached and target.startswith("worker"):
                reached.add(target)
                todo.append(target)
    assert not sorted(t for t in reached if _ring(t) == "service")


def test_one_place_builds_the_verification_policy() -> None:
    # Policy.build is called by PolicySpec.build only: the commands, the settings, the
    # workers and re-verification all describe a policy as a PolicySpec and build it there.
    callers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"build", "replacing_apple_root", "apple"}
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in {"Policy", "TrustStore"}
            ):
                callers.add(module)
    assert callers == {"worker.core.spec"}
