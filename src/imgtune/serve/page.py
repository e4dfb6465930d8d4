"""The page at ``/``: drop or pick an image, see the top 5 as bars and the heat map, and one line saying
what the model was trained on and how accurate it was, with its interval. Self-contained: its style and
script are inline and it asks only its own server (``predict``, ``explain``), so it makes no outside
request."""

from __future__ import annotations

from .service import DEFAULT_METHOD


def render_page(metadata: dict) -> str:
    from ..doctor.render import environment

    model = metadata.get("model", {}).get("name") or "model"
    return environment().get_template("serve.html.j2").render(
        title=f"imgtune: {model} ({len(metadata['classes'])} classes)", about=about_line(metadata),
        method=DEFAULT_METHOD)


def about_line(metadata: dict) -> str:
    """"Trained on 240 images of 2 classes (ants, bees); validation accuracy 0.934 (95% CI 0.895-0.967,
    153 images)." from /metadata's figures; what is missing is left out, never made up."""
    classes = metadata["classes"]
    shown = ", ".join(classes[:8]) + (f" and {len(classes) - 8} more" if len(classes) > 8 else "")
    images = metadata.get("trained_on", {}).get("images", {}).get("train")
    trained = f"Trained on {images} images" if images else "Trained"
    parts = [f"{trained} of {len(classes)} classes ({shown})"]
    for split, name in (("val", "validation"), ("test", "test")):
        values = metadata.get("metrics", {}).get(split) or {}
        if values.get("accuracy") is not None:
            parts.append(f"{name} accuracy {_with_interval(values)}")
    return "; ".join(parts) + "."


def _with_interval(values: dict) -> str:
    text = f"{values['accuracy']:.3f}"
    low_high = (values.get("ci95") or {}).get("accuracy")
    if low_high:
        text += f" (95% CI {low_high[0]:.3f}\u2013{low_high[1]:.3f}"
        return text + (f", {values['n']} images)" if values.get("n") else ")")
    return text + (f" on {values['n']} images" if values.get("n") else "")
