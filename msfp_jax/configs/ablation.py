"""The ablation of the paper's Table (signed FP + LoRA -> + mixup-sign -> + TALoRA -> + DFA).

Every variant is the base experiment with a few fields changed, run with the same calibration budget, the same
fine-tuning budget and the same evaluation, for each seed; the table reports the mean and the spread over seeds.
The base is the built-in digits model (configs/default.py) or, with `cifar10`, the built-in CIFAR-10 model
(configs/cifar10_builtin.py) at the budget below.

Launch:
  python -m msfp_jax.main --config=configs/ablation.py --workdir=runs/ablation
  python -m msfp_jax.main --config=configs/ablation.py:cifar10 --workdir=runs/ablation_cifar10
Smallest variant (smoke test): --config=configs/ablation.py:runlocal
"""
import ml_collections

from msfp_jax.configs import cifar10_builtin, common, default

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
  args = common.parse_arg(arg, runlocal=False, cifar10=False)
  base = cifar10_builtin if args.cifar10 else default
  config = base.get_config("runlocal" if args.runlocal else None)
  if args.cifar10 and not args.runlocal:
    # The CIFAR-10 budget on a 2-core CPU (docs/ablation.md): DDIM 20 for calibration, the teacher trajectories and
    # every score (the model card's 50 would cost 2.5x the sampling), FID on 1,000 samples per row and seed
    # against all 50,000 training images; calibration and fine-tuning as the main job's.
    common.set_fields(config, {"sampler.num_steps": 20, "evaluation.num_samples": 1000})
  config.ablation = ml_collections.ConfigDict()
  config.ablation.variants = VARIANTS
  config.ablation.seeds = (0, 1, 2)
  # Variant names to run (all by default); e.g. --config.ablation.only="('+ DFA (full MSFP)',)".
  config.ablation.only = ()
  if args.runlocal:
    config.ablation.seeds = (0,)
  return config
