"""genlab: a workbench for generative AI where every modality is next-token prediction.

    import genlab
    tok = genlab.train_tokenizer("docs/", vocab_size=8192, out_dir="tok")
    model = genlab.build("10m", tok)          # or genlab.load("path/to/any/hf-llama-folder")
    run = genlab.pretrain(data=["docs/"], out="runs/mine", preset="10m", max_steps=2000)
    ft = genlab.finetune(model=str(run.model_dir), data=["notes/"], out="runs/ft")   # LoRA by default
    print(model.generate("Once upon a time", max_new_tokens=40, temperature=0.8).text)
    model.save("my-model")                    # loads in transformers.AutoModelForCausalLM too
"""

__version__ = "0.1.0"

from genlab.errors import (  # noqa: E402
    ContextLengthError,
    DataError,
    GenlabError,
    InvalidParameterError,
    ModelLoadError,
    UnsupportedArchitectureError,
)


def __getattr__(name):
    # Lazy: `import genlab` (and `genlab --help`) stays fast; torch loads on first real use.
    if name in ("load", "build", "LanguageModel"):
        from genlab import lm

        return getattr(lm, name)
    if name in ("train_tokenizer", "load_tokenizer"):
        from genlab.codecs import text

        return getattr(text, name)
    if name == "pretrain":
        from genlab.train.pretrain import pretrain

        return pretrain
    if name in ("finetune", "evaluate"):
        from genlab.train import finetune

        return finetune.finetune if name == "finetune" else finetune.evaluate_model
    if name in ("index", "Retriever", "ask"):
        from genlab.rag import indexer, prompts, retrieve

        return {"index": indexer.index, "Retriever": retrieve.Retriever, "ask": prompts.ask}[name]
    if name == "SamplingParams":
        from genlab.generate.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'genlab' has no attribute {name!r}")


__all__ = [
    "load", "build", "LanguageModel", "pretrain", "finetune", "evaluate", "index", "Retriever", "ask", "train_tokenizer", "load_tokenizer", "SamplingParams",
    "GenlabError", "ModelLoadError", "UnsupportedArchitectureError", "InvalidParameterError",
    "ContextLengthError", "DataError",
]
