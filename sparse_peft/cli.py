"""`sparse-peft`: supervised fine-tuning of a causal LM with a sparse adapter, from flags or a YAML file.

    sparse-peft --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --method spiel --density 0.01 --target_modules all-linear --output_dir out
    sparse-peft --config run.yaml --learning_rate 1e-4     # YAML keys are flag names; flags win

The data, model and training flags are TRL's own (those of `trl sft`: ScriptArguments,
DatasetMixtureConfig, ModelConfig without its LoRA options, SFTConfig). Every field of SparseConfig
is a flag too, generated from the dataclass, so a new field shows up here by itself; one that
clashes with a TRL flag gets a `sparse_` prefix (`--sparse_seed`; `--seed` is the training seed).
See docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import types
from typing import Optional, Union, get_args, get_origin, get_type_hints

from peft.config import PeftConfig

from .config import SparseConfig
from .methods import METHODS, knob_fields
from .selection import CALIBRATION_RULES


NOT_FLAGS = {"sparse_peft_version", "method_config"}  # filled in by SparseConfig; knobs are flags of their own
# why TRL's LoRA flags (use_peft, lora_r, ...) are refused rather than ignored: a user who sets them expects a LoRA
LORA_HINT = "sparse-peft trains a SparseConfig, not TRL's LoRA config"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _is_union(hint) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _list_item(hint):
    """X when the field takes a list[X] (alone or as one member of a Union), else None."""
    for t in (hint, *get_args(hint)):
        if get_origin(t) is list:
            return get_args(t)[0]
    return None


def _plain(hint):
    """The field's type without None when argparse can take it as is (a number, a bool, a string, a choice)."""
    inner = [a for a in get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if len(inner) == 1 and get_origin(inner[0]) not in (list, dict, Union, types.UnionType):
        return inner[0]
    return None


def _flag_type(hint):
    """The type HfArgumentParser gets for a SparseConfig field. argparse cannot take a Union or a dict, so
    those come in as strings that `_decode` turns into values: list[str] (one value or several) for a field
    that takes a list, str (JSON) for a dict or anything else."""
    if _plain(hint) is not None:
        return Optional[_plain(hint)]
    return Optional[list[str]] if _list_item(hint) else Optional[str]


def _decode(value, hint):
    """A list- or dict-valued field, from the command line (strings) or from YAML (typed already).

    JSON ('[...]' or '{...}') is read as such. Otherwise the value is a list, with numbers cast from strings,
    except where the field also takes one string and the value is not a plain module name: 'all-linear' and
    regexes stay one string, as PEFT reads them. (A plain name as a string would be a regex over full module
    names and match nothing; as a list it matches by suffix.)
    """
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        return json.loads(value)
    item = _list_item(hint)
    if item is None:  # a dict, or another type argparse cannot take: JSON
        try:
            return json.loads(value) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"expects JSON, e.g. '{{\"o_proj\": 0.05}}' for a dict, not {value!r}") from None
    if isinstance(value, str) and str in get_args(hint) and not re.fullmatch(r"[\w.]+", value):
        return value
    cast = item if item in (int, float) else (lambda v: v)
    return [cast(v) for v in (value if isinstance(value, list) else [value])]


def _sparse_flags(taken: set[str]) -> dict:
    """{flag: (SparseConfig field or method knob, its type)} for every field and knob the user may set. A knob is a
    flag of its own (`--reselection_steps 10`), for every registered method, as `SparseConfig` takes knobs as
    keyword arguments; a knob two methods share is one flag."""
    hints = get_type_hints(SparseConfig)
    peft_own = {f.name for f in dataclasses.fields(PeftConfig)}  # peft_type, task_type, ...: set here, not by users
    fields = [(f, hints[f.name]) for f in dataclasses.fields(SparseConfig) if f.name not in peft_own | NOT_FLAGS]
    for method in METHODS.values():
        knob_hints = get_type_hints(method.Knobs) if method.Knobs is not None else {}
        fields += [(f, Optional[knob_hints[f.name]]) for f in knob_fields(method)]
    flags = {}
    for f, hint in fields:
        flags.setdefault(f"sparse_{f.name}" if f.name in taken else f.name, (f, hint))
    return flags


def _sparse_arguments(flags: dict):
    """A dataclass of the SparseConfig flags, all defaulting to None: only what the user sets is passed on,
    so every other field keeps the method's preset."""
    specs = []
    for flag, (f, hint) in flags.items():
        kind = _flag_type(hint)
        meta = {"help": f.metadata.get("help", "")}
        if flag != f.name:
            meta["help"] += f" (SparseConfig.{f.name})"
        if _plain(hint) is None:
            meta["help"] += " One value, several, or JSON." if _list_item(hint) else " As JSON."
        if kind == Optional[bool]:
            meta.update(nargs="?", const=True)  # `--head_groups` alone means true
        specs.append((flag, kind, dataclasses.field(default=None, metadata=meta)))
    specs.append(("calibration_batches", int, dataclasses.field(default=8, metadata={
        "help": "Training batches run through the model to choose the supports of an activation `selection` rule."})))
    cls = dataclasses.make_dataclass("SparseArguments", specs)
    cls._argument_group_name = "SparseConfig (unset fields take the method's values)"
    return cls


def make_parser():
    try:
        from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser
    except ImportError as e:  # TRL and datasets are the optional `train` extra
        raise SystemExit(f"sparse-peft needs TRL and datasets: pip install 'sparse-peft[train]' ({e})") from e

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    sparse_names = {f.name for f in dataclasses.fields(SparseConfig)}
    lora = {n for n in model_fields if "lora" in n or n in ("use_peft", "use_dora")} - sparse_names
    # ModelConfig without its LoRA options (lora_alpha would clash with SparseConfig's own)
    hints = get_type_hints(ModelConfig)
    model_arguments = dataclasses.make_dataclass("ModelArguments", [
        (f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                  metadata=f.metadata))
        for f in dataclasses.fields(ModelConfig) if f.name not in lora | sparse_names
    ])
    trl_types = (ScriptArguments, DatasetMixtureConfig, model_arguments, SFTConfig)
    taken = {f.name for t in trl_types for f in dataclasses.fields(t)}
    flags = _sparse_flags(taken)
    parser = TrlParser((*trl_types, _sparse_arguments(flags)), prog="sparse-peft",
                       description=__doc__.split("\n")[0].strip("`: "))
    parser.lora_flags, parser.sparse_flags = lora, flags
    return parser


def _given(argv: list[str]) -> list[str]:
    """Names of the options set on the command line or in the YAML file."""
    names = [a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")]
    if "--config" in argv[:-1]:
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
        names += list(config) if isinstance(config, dict) else []
    return names


def parse(argv=None):
    """(script, dataset mixture, model, training, sparse) arguments and the SparseConfig; exits with a
    message naming the option on a bad one."""
    from trl import ModelConfig

    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in _given(argv):
        if name in parser.lora_flags:
            instead = name.removeprefix("lora_")
            hint = f": use --{instead}" if instead in parser.sparse_flags else ""
            parser.error(f"--{name} is a LoRA option; {LORA_HINT}{hint}")
    try:
        script, mixture, model, training, sparse = parser.parse_args_and_config(argv)
        model = ModelConfig(**dataclasses.asdict(model))  # TRL's own checks and type
    except (ValueError, OSError) as e:
        parser.error(str(e))
    if not model.model_name_or_path:
        parser.error("--model_name_or_path is required (a Hub id or a local folder)")
    if not (script.dataset_name or mixture.datasets):
        parser.error("--dataset_name is required (a Hub id, a local folder or data file), or `datasets:` in --config")
    given = {}
    for flag, (f, hint) in parser.sparse_flags.items():
        value = getattr(sparse, flag)
        if value is None:  # not given: the method's preset
            continue
        try:
            given[f.name] = value if _plain(hint) is not None else _decode(value, hint)
        except ValueError as e:
            parser.error(f"--{flag}: {e}")
    try:
        # task_type makes the adapter loadable with AutoPeftModelForCausalLM too
        config = SparseConfig(task_type="CAUSAL_LM", **given)
    except (ValueError, TypeError) as e:
        parser.error(f"invalid SparseConfig: {e}")
    return script, mixture, model, training, sparse, config


def load_data(script, mixture):
    import datasets
    from trl import get_dataset

    if mixture.datasets:  # a mixture from the YAML file, as `trl sft` reads it
        return get_dataset(mixture)
    path = script.dataset_name
    if os.path.isfile(path):  # a single local file: `load_dataset` wants its format named
        ext = os.path.splitext(path)[1]
        if ext not in LOCAL_FORMATS:
            raise ValueError(f"--dataset_name {path!r}: a local file must be one of {sorted(LOCAL_FORMATS)}")
        return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, streaming=script.dataset_streaming)
    return datasets.load_dataset(path, name=script.dataset_config, streaming=script.dataset_streaming)


def calibration_batches(trainer, n: int):
    """The first n training batches, in order: the same on every process, so DDP ranks choose the same supports."""
    from torch.utils.data import DataLoader

    loader = DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size,
                        collate_fn=trainer.data_collator)
    inputs = ("input_ids", "attention_mask", "position_ids")  # the collator also adds labels and masks for the loss
    for batch in itertools.islice(loader, n):
        yield {k: v.to(trainer.model.device) for k, v in batch.items() if k in inputs}


def base_model_path(name_or_path: str) -> str:
    """What the base is loaded from, and so what adapter_config.json's `base_model_name_or_path` records:
    a local folder as an absolute path (a relative one would load the adapter only from the directory it
    was trained in), a Hub id as given."""
    return os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path


def main(argv=None) -> int:
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer, get_quantization_config

    from . import calibrate  # importing the package registers the sparse type with PEFT (and its schedules run by themselves)

    script, mixture, model_args, training, sparse, config = parse(argv)

    quantization = get_quantization_config(model_args)  # --load_in_8bit / --load_in_4bit: bitsandbytes bases
    model_kwargs = dict(
        revision=model_args.model_revision, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        trust_remote_code=training.trust_remote_code, quantization_config=quantization,
        # a quantized base is placed at load time, each process on its own GPU
        device_map={"": PartialState().local_process_index} if quantization is not None else None,
    )
    model_kwargs.update(training.model_init_kwargs or {})
    base = base_model_path(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(base, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(base, revision=model_args.model_revision,
                                              trust_remote_code=training.trust_remote_code)

    dataset = load_data(script, mixture)
    evaluate = training.eval_strategy != "no"
    for split in [script.dataset_train_split] + [script.dataset_test_split] * evaluate:
        if split not in dataset:
            raise ValueError(f"the dataset has no split {split!r}, only {list(dataset)}: see --dataset_train_split "
                             "and --dataset_test_split")
    trainer = SFTTrainer(
        model=model, args=training, processing_class=tokenizer, peft_config=config,
        train_dataset=dataset[script.dataset_train_split],
        eval_dataset=dataset[script.dataset_test_split] if evaluate else None,
    )
    if config.selection in CALIBRATION_RULES:
        # the support of a data-driven rule is a placeholder until it has seen data (gradient rules: with labels)
        calibrate(trainer.model, calibration_batches(trainer, sparse.calibration_batches),
                  progress=not training.disable_tqdm)

    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    if training.push_to_hub:  # saves to output_dir, then uploads it (save_model would push once more)
        trainer.push_to_hub(dataset_name=script.dataset_name)
        trainer.accelerator.print(f"adapter saved to {training.output_dir} and pushed to {trainer.hub_model_id}")
    else:
        trainer.save_model(training.output_dir)
        trainer.accelerator.print(f"adapter saved to {training.output_dir}")
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()
    return 0


if __name__ == "__main__":
    sys.exit(main())
