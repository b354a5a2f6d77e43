"""The model card (``README.md``) of a model folder, written from its ``config.json`` alone.

Sections: what the model is (method, network, classes), the data it was trained and scored on,
its metrics with the protocol that measured them, the command that trained it, how to use it and
how to cite the method. Hub tools read the YAML front matter (library, licence, tags).
"""

from __future__ import annotations

from collections.abc import Sequence

#: The PLCA paper, as BibTeX (also in README.md and CITATION.cff).
PLCA_BIBTEX = """@inproceedings{kang2020plca,
  title     = {Pixel-Level Cycle Association: A New Perspective for Domain Adaptive Semantic Segmentation},
  author    = {Kang, Guoliang and Wei, Yunchao and Yang, Yi and Zhuang, Yueting and Hauptmann, Alexander G.},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  volume    = {33},
  year      = {2020}
}"""

_METHODS = {
    "source_only": "trained on the labelled source domain only (cross-entropy + Lovasz-softmax): the baseline "
                   "the adaptation gains are measured against",
    "plca": "adapted with Pixel-Level Cycle Association (Kang et al., NeurIPS 2020): source-target pixel cycles "
            "pulled together at feature and classifier level, plus the labelled source loss",
    "self_training": "adapted by self-training with an EMA teacher's pseudo-labels on the target domain "
                     "(DAFormer's recipe), with PLCA's association on top when the config's plca section "
                     "enables it",
}


def _data_lines(config: dict) -> list[str]:
    data = config.get("data") or {}
    lines = []
    for role, what in (("source", "labelled source"), ("target", "unlabelled target"),
                       ("val", "validation (scored)")):
        part = data.get(role)
        if isinstance(part, dict):
            lines.append(f"- {what}: format `{part.get('format')}`, split `{part.get('split')}` "
                         f"(root `{part.get('root')}` on the training machine)")
    return lines or ["- not recorded"]


def _metrics_lines(metrics: dict | None, classes: Sequence[str]) -> list[str]:
    if not metrics:
        return ["No metrics were recorded with this model (only a finished run's final model has them): "
                "`plca evaluate --checkpoint FOLDER` scores it."]
    per_class = metrics.get("per_class_IoU") or {}
    lines = [f"Main protocol {metrics.get('protocol')}; measured: {metrics.get('measured')}.", ""]
    for name, entry in (metrics.get("protocols") or {}).items():
        value = entry.get("mIoU") if isinstance(entry, dict) else None
        lines.append(f"- **{name}**: {value:.2f}" if isinstance(value, (int, float)) else f"- **{name}**: n/a")
    if per_class:
        lines += ["", "| class | IoU |", "| --- | --- |"]
        for name in classes:
            value = per_class.get(name)
            lines.append(f"| {name} | {value:.2f} |" if isinstance(value, (int, float)) else f"| {name} | n/a |")
    return lines


def model_card(data: dict) -> str:
    """The Markdown model card of a model folder whose ``config.json`` is ``data``."""
    segmentor, training = data["segmentor"], data.get("training") or {}
    config = training.get("config") or {}
    method = training.get("method")
    network = f"{segmentor['backbone']} + {segmentor['head']} head"
    front = ["---", "library_name: plca", "license: mit", "pipeline_tag: image-segmentation",
             "tags:", "- semantic-segmentation", "- domain-adaptation", f"- {method}", "---", ""]
    lines = front + [
        f"# {method} - {network}, {data['num_labels']} classes", "",
        f"A semantic segmentation model {_METHODS.get(method, f'trained with the `{method}` method')}.", "",
        f"- network: {network} (style {segmentor.get('style')}, features {segmentor.get('features')}); input "
        f"RGB 0-255, normalised inside the model ({data.get('normalization')})",
        f"- classes (output channels, in order): {', '.join(data['classes'])}",
        f"- test time: {data['inference']}", "",
        "## Data", "", *_data_lines(config), "",
        "## Metrics", "", *_metrics_lines(data.get("metrics"), data["classes"]), "",
        "## Training", "", f"Step {training.get('step')}; the full resolved config is in `config.json` "
        "(`training.config`). The command that trained it:", "",
        "```bash", training.get("command") or "(not recorded)", "```", "",
        "## Use", "", "```python", "import plca", "", "model = plca.load_model(\"path/to/this/folder\")",
        "labels = plca.segment(model, image)  # (H, W) class ids; model.classes names them", "```", "",
        "or `plca predict --checkpoint path/to/this/folder --input photos/ --output predictions/`.", "",
        "## Citation", "", "```bibtex", PLCA_BIBTEX, "```", "",
    ]
    return "\n".join(lines)
