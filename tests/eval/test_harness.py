"""lm-eval tasks through quantkern (issue #17): a local multiple-choice task file (no dataset hub), the
accuracy lm-eval reports equal to a direct computation of the same log-likelihoods."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import quantkern as qk
from fixtures.quant_models import byte_tokenizer as _byte_tokenizer

pytest.importorskip("lm_eval")

QUESTIONS = [("The sky is", [" blue", " green", " loud"], 0), ("Two plus two is", [" four", " five"], 0),
             ("Fire is", [" cold", " hot"], 1), ("Ice is", [" hot", " cold", " purple"], 1),
             ("A cat says", [" moo", " meow"], 1), ("The sun rises in the", [" east", " west"], 0)]


def _task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    with (d / "qk_toy.jsonl").open("w") as f:
        for q, choices, gold in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    (d / "qk_toy.yaml").write_text(textwrap.dedent(f"""\
        task: qk_toy
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'qk_toy.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: gold
        target_delimiter: ""
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    return d


def _direct_accuracy(model, tok):
    right = 0
    for q, choices, gold in QUESTIONS:
        ctx = tok.encode(q, add_special_tokens=False)
        scores = []
        for c in choices:
            cont = tok.encode(c, add_special_tokens=False)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            scores.append(float(logp[len(ctx) - 1:, :].gather(1, tgt[len(ctx) - 1:, None]).sum()))
        right += int(max(range(len(choices)), key=scores.__getitem__) == gold)
    return right / len(QUESTIONS)


def test_local_task_on_quantized_model_equals_direct_loglikelihoods(tiny_llama, tmp_path):
    from quantkern.eval.harness import evaluate_tasks

    model = qk.RTNQuantizer(tiny_llama, bits=4, group_size=32, verbose=False).quantize()
    tok = _byte_tokenizer()
    tasks = _task_dir(tmp_path)
    res = evaluate_tasks(model, tok, "qk_toy", include_path=tasks, batch_size=2)
    assert set(res) == {"qk_toy"}
    assert res["qk_toy"]["acc,none"] == pytest.approx(_direct_accuracy(model, tok))
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_tasks(model, tok, "qk_toy_missing", include_path=tasks)
    with pytest.raises(ValueError, match="not a directory"):
        evaluate_tasks(model, tok, "qk_toy", include_path=tmp_path / "nowhere")


def test_cli_eval_tasks(cli_serves_tiny_llama, tmp_path, capsys, monkeypatch):
    from quantkern import cli

    import quantkern.models

    monkeypatch.setattr(quantkern.models, "load_model", lambda name, device="cpu", **kw: (cli_serves_tiny_llama,
                                                                                          _byte_tokenizer()))
    assert cli.main(["eval", "tiny", "--tasks", "qk_toy", "--include-path", str(_task_dir(tmp_path))]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tasks"]["qk_toy"]["acc,none"] == pytest.approx(_direct_accuracy(cli_serves_tiny_llama, _byte_tokenizer()))
