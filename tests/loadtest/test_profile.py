from __future__ import annotations

from loadtest.profile import summarise


def test_py_spy_raw_stacks_are_summarised_by_process_and_leaf() -> None:
    raw = "\n".join([
        'process 1:"python -m serve.cli up";main (cli.py:1);loop (x.py:2) 6',
        'process 1:"python -m serve.cli up";process 2:"ray::ServeReplica";matmul (torch.py:3) 3',
        'process 1:"python -m serve.cli up";process 2:"ray::ServeReplica";loop (x.py:2) 1',
    ])  # fmt: skip
    s = summarise(raw)
    assert s["samples"] == 10
    assert dict(s["by_process"]) == {"python -m serve.cli up": 0.6, "ray::ServeReplica": 0.4}
    assert dict(s["by_leaf"]) == {"loop (x.py:2)": 0.7, "matmul (torch.py:3)": 0.3}
