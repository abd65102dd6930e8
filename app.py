"""A web page to try a trained checkpoint: type a text, see each class's probability.

    pip install -r requirements-app.txt          # gradio: an optional dependency, used only here
    python app.py --ckpt best.pt                 # then open http://127.0.0.1:7860
    python app.py --ckpt best.pt --host 0.0.0.0  # reachable from other machines: no login!
    demo = app.main(["--ckpt", "best.pt"])       # a notebook cell: the page shows below it
                                                 # (Colab: through its proxy, for you alone)

    python app.py --ckpt export --host 0.0.0.0  # an export.py folder: no torch needed (serve.py)

The page calls predict.py's inference path (model.load_classifier, or serve.py for an export
folder), so it shows calibrated probabilities. It is also an API:
    from gradio_client import Client
    Client("http://127.0.0.1:7860/").predict("Stocks rally ...", api_name="/predict")
    # -> {"label": "Business", "confidences": [{"label": "Business", "confidence": 0.95}, ...]}
"""
import argparse
import os
import sys

from basics import UserError, add_device_flags, clean, frees_on_stop, in_notebook, parse_args
from predict import open_classifier
from serve import HEADLINES

EXAMPLES = HEADLINES[:5]


def build_parser():
    p = argparse.ArgumentParser(
        description="A Gradio page (and HTTP API) that classifies texts with a checkpoint.")
    p.add_argument("--ckpt", default="best.pt",
                   help="checkpoint written by train.py, or a folder written by export.py")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, help="default: 7860, or the next free one")
    p.add_argument("--share", action="store_true",
                   help="also open a public https://*.gradio.live link: anyone who has it can use "
                        "the app and its API, with no login, while it runs, and what they type "
                        "passes through Gradio's share server")
    add_device_flags(p)
    return p


def import_gradio():
    # Gradio reads this at import and would otherwise send usage analytics; this app never phones
    # home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise UserError("app.py needs gradio, an optional dependency: "
                        "pip install -r requirements-app.txt") from None
    return gradio


def build_app(gr, classify, class_names, title, how_to_clean="agnews"):
    """The page: a textbox, a Label with every class's probability, example headlines. API name:
    /predict."""
    def topic_probabilities(text):
        if not text or not clean(text, how_to_clean):
            raise gr.Error("Type a headline (or a headline and its first sentence) first.")
        return dict(zip(class_names, classify([text])[0].tolist()))

    with gr.Blocks(title="News topic classifier", analytics_enabled=False) as demo:
        gr.Markdown(f"## News topic classifier\n{title}")
        label = gr.Label(num_top_classes=len(class_names), label="Topic probabilities",
                         render=False)
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Headline or short news text", value=EXAMPLES[0], lines=3)
                button = gr.Button("Classify", variant="primary")
                # cache_examples=False: nothing is computed at launch or written to disk; a click
                # classifies.
                gr.Examples(EXAMPLES, inputs=text, outputs=label, fn=topic_probabilities,
                            run_on_click=True, cache_examples=False, label="Examples (click one)")
            # created above so the examples can target it; shown here, right of the text
            label.render()
        button.click(topic_probabilities, text, label, api_name="predict")
        text.submit(topic_probabilities, text, label, api_visibility="private")
        # Classify the pre-filled example as the page opens, so it never starts with an empty chart.
        demo.load(topic_probabilities, text, label, api_visibility="private")
    return demo


def describe(ckpt_path, info):
    enc = info["encoder_config"]
    return (f"Checkpoint `{ckpt_path}`: a {enc.get('num_hidden_layers', '?')}-layer "
            f"{enc.get('model_type', '?')} encoder"
            + (f" (ONNX, {info['precision']})" if "precision" in info else "")
            + f", epoch {info['position']['epoch'] + 1}, "
            f"validation accuracy {info['position']['best_val_accuracy']:.3f}. "
            f"Topics: {', '.join(info['class_names'])}.")


@frees_on_stop
def main(argv=None):
    """-> the running gradio app; a notebook cell gets it back at once (demo.close() stops it),
    a shell waits until Ctrl-C."""
    args = parse_args(build_parser(), argv)
    gr = import_gradio()  # before loading the model: fail in a second, not after it
    if "COLAB_RELEASE_TAG" in os.environ and not in_notebook() and not args.share:
        print("note: `!python app.py` in Colab listens on the VM, which your browser cannot "
              "reach. Run it from a cell instead (import app; demo = app.main([...])), or add "
              "--share.")
    classify, info = open_classifier(args.ckpt, args.device, args.amp, args.amp_dtype)
    demo = build_app(gr, classify, info["class_names"], describe(args.ckpt, info), info["clean"])
    try:
        # share: explicit, as in Colab gradio would otherwise turn a public link on by itself
        demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                    show_error=True, prevent_thread_lock=in_notebook())
    except OSError:
        # gradio's "Cannot find empty port", whose advice names its own settings, not our flags
        raise UserError(f"--host {args.host} --port {args.port or 7860}: cannot listen there "
                        f"(the port is in use, or the address is not one of this machine's); "
                        f"try another --port") from None
    return demo


# `python app.py` and `%run app.py` set __file__; a pasted cell only defines main().
if __name__ == "__main__" and "__file__" in globals():
    main(sys.argv[1:])
