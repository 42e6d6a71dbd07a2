"""sacreBLEU as a local ``evaluate`` metric script, for machines without access to the Hugging Face Hub.

``evaluate.load("sacrebleu")`` downloads its script from the Hub (``evaluate-metric/sacrebleu``); offline it fails.
This file is a self-contained metric script with the same inputs and outputs (``predictions``: list of str,
``references``: list of list of str; returns ``score``, ``counts``, ``totals``, ``precisions``, ``bp``, ``sys_len``,
``ref_len``), computed by the ``sacrebleu`` package itself, so ``evaluate.load(path_to_this_file)`` works offline.
``hf_multimax.finetune.tasks.load_sacrebleu`` loads it.

It must import nothing from ``hf_multimax``: ``evaluate`` copies the file into its module cache and imports it alone.
"""

import datasets
import evaluate
import sacrebleu as scb

_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = "Corpus BLEU computed by sacreBLEU (local copy of the `sacrebleu` metric of `evaluate`)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): translations to score.
    references (list of list of str): one or more references per prediction (same count for every prediction).
    smooth_method, smooth_value, force, lowercase, tokenize, use_effective_order: as `sacrebleu.corpus_bleu`.
Returns:
    score (float, 0-100), counts, totals, precisions, bp, sys_len, ref_len.
"""


class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            homepage="https://github.com/mjpost/sacreBLEU",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/mjpost/sacreBLEU"],
            reference_urls=["https://github.com/mjpost/sacreBLEU"],
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=False,
        tokenize=None,
        use_effective_order=False,
    ):
        if isinstance(references[0], str):
            references = [[ref] for ref in references]
        count = len(references[0])
        if any(len(refs) != count for refs in references):
            raise ValueError("sacreBLEU requires the same number of references for each prediction")
        transposed = [[refs[i] for refs in references] for i in range(count)]
        output = scb.corpus_bleu(
            predictions,
            transposed,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            force=force,
            lowercase=lowercase,
            use_effective_order=use_effective_order,
            **({"tokenize": tokenize} if tokenize else {}),
        )
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
        }
