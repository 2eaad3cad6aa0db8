"""The ablation of the paper's Table (signed FP + LoRA -> + mixup-sign -> + TALoRA -> + DFA) on the built-in model.

Every variant is the default experiment (configs/default.py) with a few fields changed, run with the same
calibration budget, the same fine-tuning budget and the same evaluation, for each seed; the table reports the
mean and the spread over seeds.

Launch:
  python -m msfp_jax.main --config=configs/ablation.py --workdir=runs/ablation
Smallest variant (smoke test): --config=configs/ablation.py:runlocal
"""
import ml_collections

from msfp_jax.configs import common, default

# (name, which model is scored, overrides of the default experiment as (field, value) pairs), in the order of
# the paper's ablation. "ptq" variants are scored after calibration, "finetuned" ones after fine-tuning.
VARIANTS = (
    ("INT4 PTQ (INT baseline)", "ptq", (("quant.kind", "int"), ("quant.sign_mode", "signed"))),
    ("signed FP4 PTQ", "ptq", (("quant.sign_mode", "signed"),)),
    ("mixup-sign FP4 PTQ", "ptq", ()),
    # Shortcut splitting's own effect at PTQ: the up-blocks' concatenated inputs under one quantizer.
    ("signed FP4 PTQ without shortcut splitting", "ptq", (("quant.sign_mode", "signed"),
                                                         ("quant.split_shortcut", False))),
    ("mixup-sign FP4 PTQ without shortcut splitting", "ptq", (("quant.split_shortcut", False),)),
    ("signed FP4 + LoRA", "finetuned", (("quant.sign_mode", "signed"), ("lora.num_banks", 1),
                                        ("finetune.dfa_weighting", "none"))),
    ("+ mixup-sign (MSFP + LoRA)", "finetuned", (("lora.num_banks", 1), ("finetune.dfa_weighting", "none"))),
    ("+ TALoRA (K=4)", "finetuned", (("finetune.dfa_weighting", "none"),)),
    ("+ DFA (full MSFP)", "finetuned", ()),
    ("full MSFP without shortcut splitting", "finetuned", (("quant.split_shortcut", False),)),
    ("W6A6 full MSFP", "finetuned", (("quant.weight_bits", 6), ("quant.act_bits", 6))),
    ("W4A8 full MSFP", "finetuned", (("quant.act_bits", 8),)),
)


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = default.get_config("runlocal" if args.runlocal else None)
  config.ablation = ml_collections.ConfigDict()
  config.ablation.variants = VARIANTS
  config.ablation.seeds = (0, 1, 2)
  # Variant names to run (all by default); e.g. --config.ablation.only="('+ DFA (full MSFP)',)".
  config.ablation.only = ()
  if args.runlocal:
    config.ablation.seeds = (0,)
  return config
