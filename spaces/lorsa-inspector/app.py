"""Lorsa inspector: browse the heads of a Lorsa, read one head, and watch heads fire on your own text.

    python spaces/lorsa-inspector/app.py --lorsa PATH_OR_ID [--model PATH_OR_ID]

Defaults come from LORSA_ID / LORSA_SUBFOLDER / LORSA_MODEL / LORSA_GGUF_FILE; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT
are honoured. All logic lives in hf_lorsa.analysis.inspector; this file is UI only.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field

import gradio as gr
from transformers import HfArgumentParser

from hf_lorsa.analysis.inspector import InspectorError, cached_inspector, describe, release_subfolders
from hf_lorsa.base.placement import DEVICE_MAP_HELP, MAX_MEMORY_HELP, OFFLOAD_HELP, check_placement

CSS = """
.tok { white-space: pre; font-family: monospace; }
.context { margin: 4px 0; line-height: 1.9; }
.heatmap { overflow: auto; max-width: 100%; }
.heatmap table, .active, .sources { border-collapse: collapse; font-size: 11px; }
.heatmap td { width: 14px; min-width: 14px; height: 14px; border: 1px solid #eee; padding: 0; }
.heatmap th.col { writing-mode: vertical-rl; font-weight: normal; }
"""
SHARE_TITLE = "share of the head's OV map inside each host head's OV subspace (subspaces overlap: no sum to 1)"


def guarded(n_outputs: int):
    """A user's mistake shows as a warning and clears the outputs (no stale view, no traceback in the log);
    anything else is an error message, and the app keeps serving."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            try:
                return fn(*args)
            except InspectorError as err:
                gr.Warning(str(err))
                return None if n_outputs == 1 else (None,) * n_outputs
            except Exception as err:  # noqa: BLE001 - the app keeps serving whatever one request did
                raise gr.Error(f"Something went wrong: {type(err).__name__}: {err}") from err

        return wrapper

    return wrap


def build(lorsa_id: str, model_id: str | None, subfolder: str = "", gguf_file: str | None = None,
          spread: tuple = (None, None, None)) -> gr.Blocks:  # fmt: skip
    """The page; `spread`: the host's (device_map, max_memory, offload_folder), for a host larger than memory."""
    layers = release_subfolders(lorsa_id, subfolder)  # a release: one Lorsa per layer, picked in the page

    def inspector(sub: str):
        return cached_inspector(lorsa_id, model_id, sub, gguf_file, spread)

    def header_of(sub: str) -> str:
        try:
            return f"# Lorsa inspector\n{describe(inspector(sub))}"
        except InspectorError as err:
            return f"# Lorsa inspector\n**Cannot inspect:** {err}"

    first = layers[0] if layers else subfolder
    try:
        first_inspector = inspector(first)
        notice, tags = first_inspector.notice, first_inspector.tag_choices()
        sorts, probes = first_inspector.sort_choices(), first_inspector.probe_choices()
    except InspectorError as err:  # nothing to show: stop with the reason instead of serving an empty page
        raise SystemExit(f"app.py: cannot inspect {lorsa_id}: {err}") from None

    with gr.Blocks(title="Lorsa inspector") as demo:
        if layers:
            layer = gr.Dropdown(layers, value=first, label="layer", elem_id="layer-picker")
        else:
            layer = gr.State(first)
        header = gr.Markdown(header_of(first), elem_id="inspector-header")
        if notice:
            gr.Markdown(f"*{notice}*", elem_id="analysis-notice")
        with gr.Tabs() as tabs:
            with gr.Tab("Head browser", id="browser"):
                with gr.Row():
                    tag = gr.Dropdown(tags, value="any", label="tag", elem_id="tag-filter")
                    token = gr.Textbox(label="promotes token (Enter: heads ranked by its logit)", placeholder="e.g. the",
                                       elem_id="token-filter")  # fmt: skip
                    sort = gr.Dropdown(sorts, value="frequency", label="sort by", elem_id="sort-by")
                    probe = gr.Dropdown(probes, value="any", label="probe", elem_id="probe-filter")
                    min_score = gr.Slider(0, 1, value=0.5, step=0.05, label="probe score ≥", elem_id="min-score")
                table = gr.Dataframe(label="heads (click a row to open the head)", interactive=False,
                                     elem_id="head-table")  # fmt: skip
                with gr.Row():
                    caption = gr.Markdown(elem_id="table-caption")
                    previous = gr.Button("◀ previous", elem_id="table-previous", size="sm")
                    page_number = gr.Number(value=1, precision=0, label="page", elem_id="table-page", minimum=1)
                    following = gr.Button("next ▶", elem_id="table-next", size="sm")
            with gr.Tab("Head", id="head"):
                with gr.Row():
                    head = gr.Number(value=0, precision=0, label="head", elem_id="head-number")
                    show = gr.Button("Show head", elem_id="show-head")
                summary = gr.Markdown(elem_id="head-summary")
                contexts = gr.HTML(elem_id="head-contexts")
                samples = gr.HTML(elem_id="head-samples")
                pattern = gr.HTML(elem_id="head-pattern")
                with gr.Row():
                    logits = gr.BarPlot(
                        x="token", y="logit", title="promoted / suppressed tokens", sort="y", elem_id="head-logits"
                    )
                    hosts = gr.BarPlot(x="host head", y="share", title=SHARE_TITLE, elem_id="head-hosts")
                with gr.Row():
                    histogram = gr.BarPlot(x="log10 activation", y="activations", title="activation histogram", sort="x",
                                           elem_id="head-histogram")  # fmt: skip
                    similar = gr.Dataframe(label="heads most like it (click one to open it)", interactive=False,
                                           elem_id="head-similar")  # fmt: skip
            with gr.Tab("Your text", id="text"):
                text = gr.Textbox(label="text", lines=3, elem_id="user-text")
                with gr.Row():
                    text_head = gr.Number(value=0, precision=0, label="head", elem_id="text-head")
                    run = gr.Button("Analyse text", elem_id="analyse-text")
                tokens = gr.HighlightedText(
                    label="tokens, shaded by the head's activation (click a token for its z-pattern)",
                    combine_adjacent=False, show_legend=False, elem_id="text-tokens",
                )  # fmt: skip
                with gr.Row():
                    position = gr.Number(value=0, precision=0, label="token position", elem_id="text-position")
                    zbutton = gr.Button("Show z-pattern", elem_id="show-zpattern")
                zpattern = gr.HTML(elem_id="text-zpattern")
                at_token = gr.Dataframe(label="every head active at that token, with the sources it read (click one to "
                                        "open it)", interactive=False, elem_id="text-position-heads")  # fmt: skip
                active = gr.HTML(elem_id="text-active")

        @guarded(3)
        def browse(sub, tag, token, sort, probe, min_score, page):
            i = inspector(sub)
            return i.head_table_page(i.head_table(tag, token or "", sort, probe, min_score), page)

        @guarded(8)
        def head_page(sub, h):
            i = inspector(sub)
            return (i.head_summary(h), i.contexts_html(h), i.samples_html(h), i.pattern_html(h), i.logit_table(h),
                    i.host_table(h), i.histogram_table(h), i.similar_table(h))  # fmt: skip

        def open_row(sub, evt: gr.SelectData):
            h = int(evt.row_value[0])
            return (h, *head_page(sub, h), gr.Tabs(selected="head"))

        @guarded(2)
        def analyse(sub, t, h):
            i = inspector(sub)
            analysis = i.text(t)
            return i.shaded_tokens(analysis, h), i.text_html(analysis)

        @guarded(1)
        def z_pattern(sub, t, q, h):
            return inspector(sub).text_pattern_html(t, q, h)

        @guarded(1)
        def heads_at(sub, t, q):
            return inspector(sub).position_heads(t, q)

        def pick_token(sub, t, h, evt: gr.SelectData):
            return evt.index, z_pattern(sub, t, evt.index, h), heads_at(sub, t, evt.index)

        def first_page(*options):
            return browse(*options, 1)

        def turn(step):
            return lambda *options: browse(*options[:-1], (options[-1] or 1) + step)

        filters = [layer, tag, token, sort, probe, min_score]
        listing = [table, caption, page_number]
        for control in (tag, sort, probe, min_score):
            control.change(first_page, filters, listing)
        token.submit(first_page, filters, listing)  # a search on Enter, not on each key (a word's prefix is no token)
        token.blur(first_page, filters, listing)
        demo.load(first_page, filters, listing)
        page_number.submit(browse, [*filters, page_number], listing)
        previous.click(turn(-1), [*filters, page_number], listing)
        following.click(turn(1), [*filters, page_number], listing)
        if layers:  # another layer: its header and head table
            layer.change(header_of, layer, header, api_name="pick_layer").then(first_page, filters, listing)
        page = [summary, contexts, samples, pattern, logits, hosts, histogram, similar]
        table.select(open_row, layer, [head, *page, tabs])
        similar.select(open_row, layer, [head, *page, tabs])
        at_token.select(open_row, layer, [head, *page, tabs])
        show.click(head_page, [layer, head], page)
        run.click(analyse, [layer, text, text_head], [tokens, active])
        text_head.submit(analyse, [layer, text, text_head], [tokens, active])
        tokens.select(pick_token, [layer, text, text_head], [position, zpattern, at_token])
        zbutton.click(z_pattern, [layer, text, position, text_head], zpattern).then(
            heads_at, [layer, text, position], at_token
        )
    return demo


def check_port() -> None:
    """GRADIO_SERVER_PORT that is taken: say so, instead of moving to another port without a word."""
    port = os.environ.get("GRADIO_SERVER_PORT")
    if not port:
        return
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: only a listener blocks
        try:
            s.bind((host if host != "0.0.0.0" else "", int(port)))
        except OSError as err:
            raise SystemExit(
                f"Port {port} (GRADIO_SERVER_PORT) is in use ({err.strerror}); stop the other server or choose "
                "another port."
            ) from None


@dataclass
class SpaceArguments:
    """Which Lorsa to inspect; on a Space, the variables LORSA_ID, LORSA_SUBFOLDER, LORSA_MODEL, LORSA_GGUF_FILE."""

    lorsa: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_ID"), metadata={"help": "Lorsa folder or Hub id (LORSA_ID)"}
    )
    subfolder: str = field(
        default_factory=lambda: os.environ.get("LORSA_SUBFOLDER", ""), metadata={"help": "one layer of a release"}
    )
    model: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_MODEL"),
        metadata={"help": "host model (LORSA_MODEL; None: the Lorsa's base model)"},
    )
    gguf_file: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_GGUF_FILE"),
        metadata={"help": "GGUF file of the host model (LORSA_GGUF_FILE; None: the Lorsa's recorded one)"},
    )
    device_map: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_DEVICE_MAP"),
        metadata={"help": f"{DEVICE_MAP_HELP} (LORSA_DEVICE_MAP)"},
    )
    max_memory: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_MAX_MEMORY"),
        metadata={"help": f"{MAX_MEMORY_HELP} (LORSA_MAX_MEMORY)"},
    )
    offload_folder: str | None = field(
        default_factory=lambda: os.environ.get("LORSA_OFFLOAD_FOLDER"),
        metadata={"help": f"{OFFLOAD_HELP} (LORSA_OFFLOAD_FOLDER)"},
    )


def main() -> None:
    parser = HfArgumentParser(SpaceArguments, prog="app.py", description="Inspect the heads of a Lorsa.")
    (args,) = parser.parse_args_into_dataclasses()
    if not args.lorsa:
        parser.error("give --lorsa or set LORSA_ID")
    spread = (args.device_map, args.max_memory, args.offload_folder)
    try:
        check_placement(*spread)
    except ValueError as err:
        parser.error(str(err))
    check_port()
    build(args.lorsa, args.model, args.subfolder, args.gguf_file, spread).queue().launch(css=CSS)


if __name__ == "__main__":
    main()
