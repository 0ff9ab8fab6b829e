"""The Colab notebooks (colab/*.ipynb) run top to bottom on CPU and are stored clean.

Each notebook runs in a fresh kernel (nbclient) whose working directory and PYTHONPATH
are this checkout, so it imports this kvjax. Its sizes come from its one cell tagged
``parameters``; the test inserts a cell right after it that reassigns some of them to CI
sizes (``CI_PARAMETERS``; papermill injects parameters the same way). An error in any
cell fails the test. With the checkout's kvjax importable, jax >= 0.10 and flax >= 0.12.1
the install cell does nothing (checked), and ``HF_HUB_OFFLINE=1`` makes the Hub section
skip.
"""

import ast
import os
import re

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = ["01_quickstart.ipynb", "02_kv_cache_explained.ipynb", "03_sharding.ipynb",
             "04_memory_and_serving.ipynb"]
CELL_TIMEOUT_S = 300

# What each notebook's parameters become in CI: small enough for about a minute each on
# two CPU cores. Every name must be assigned in the notebook's parameters cell.
CI_PARAMETERS = {
    "01_quickstart.ipynb": """
PROMPTS = ["The list type", "A dictionary maps"]
MAX_NEW_TOKENS = 16
CHAT_MAX_NEW_TOKENS = 8
""",
    "02_kv_cache_explained.ipynb": """
HAND_STEPS = 4
TIMING_LENGTHS = [8, 32]
TIMING_REPEATS = 1
NNX_STEPS = 4
""",
    "03_sharding.ipynb": """
MAX_NEW_TOKENS = 8
SPEED_CONFIG_CPU = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=8,
                        num_kv_heads=8, head_dim=8, vocab_size=256)
SPEED_BATCH = 8
SPEED_PROMPT_TOKENS = 8
SPEED_NEW_TOKENS = 8
""",
    "04_memory_and_serving.ipynb": """
QUALITY_ROWS = 2
QUALITY_TOKENS = 32
GREEDY_NEW_TOKENS = 16
STREAM_NEW_TOKENS = 96
PREFIX_REQUESTS = 8
ENGINE_REQUESTS = 3
ENGINE_PREFILL_TOKENS = 16
ENGINE_MAX_TOKENS = 8
""",
}


def read(name):
    return nbformat.read(os.path.join(COLAB, name), as_version=4)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def parameters_cell(nb):
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def assigned_names(source):
    return {target.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def repository_url():
    """``[project.urls] Repository`` of pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    urls = re.search(r"^\[project\.urls\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert urls, "pyproject.toml has no [project.urls] table"
    repository = re.search(r'^Repository\s*=\s*"([^"]+)"', urls.group(1), re.M)
    assert repository, "pyproject.toml's [project.urls] has no Repository"
    return repository.group(1).rstrip("/")


def colab_url(name):
    """The "Open in Colab" address of a notebook of the repository pyproject names."""
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repository_url())
    assert owner_repo, f"Repository {repository_url()!r} is not a https://github.com/OWNER/NAME URL"
    return (f"https://colab.research.google.com/github/{owner_repo.group(1)}"
            f"/blob/main/colab/{name}")


def test_the_four_notebooks_are_there():
    assert sorted(n for n in os.listdir(COLAB) if n.endswith(".ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    nb = read(name)
    nbformat.validate(nb)
    for index, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"{name}: code cell {index} is stored with outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
    # the header says what the runtime needs and how long it takes, with its own badge
    header = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown"
    assert "**Runtime:**" in header and "**Running time:**" in header
    assert colab_url(name) in header
    # the install cell comes first and reads one variable for where kvjax comes from
    install = code_cells(nb)[0].source
    assert re.findall(r"^KVJAX_SOURCE = ", install, re.M) == ["KVJAX_SOURCE = "]
    assert '"pip", "install", "-q", KVJAX_SOURCE' in install
    # every CI override names a parameter of the notebook
    params = assigned_names(nb.cells[parameters_cell(nb)].source)
    overridden = assigned_names(CI_PARAMETERS[name])
    assert overridden <= params, f"{name}: CI overrides unknown parameters {overridden - params}"


def test_readme_badges_point_at_the_repository():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = re.search(r"^## Notebooks\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no '## Notebooks' section (one Open in Colab badge a notebook)"
    expected = {colab_url(name) for name in NOTEBOOKS}
    found = set(re.findall(r"https://colab\.research\.google\.com/github/[^\s)\"'>]+", readme))
    assert found == expected, f"README's Colab links {sorted(found)} are not {sorted(expected)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name):
    nb = read(name)
    injected = nbformat.v4.new_code_cell(CI_PARAMETERS[name].strip())
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_cell(nb) + 1, injected)

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # each notebook decides its own CPU devices (03 asks for 8)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": ROOT}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback

    install_output = "".join(out.get("text", "") for out in code_cells(nb)[0].outputs)
    assert "nothing to install" in install_output, install_output
