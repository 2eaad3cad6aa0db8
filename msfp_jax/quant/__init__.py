"""msfp_jax.quant: FP formats, fake quantization, rules, calibration and the Flax quantization interceptor.

    from msfp_jax.quant import QuantConfig, calibrate, quantized_apply
    qstate = calibrate(model, variables, batches, QuantConfig(weight_bits=4, act_bits=4))
    y = quantized_apply(model, variables, qstate, *args)       # inside jax.jit
"""
from msfp_jax.quant.config import (
    CalibrationError,
    InvalidQuantConfigError,
    QuantConfig,
    QuantizationError,
    QuantRule,
    QuantStateMismatchError,
    RuleMatchError,
)
from msfp_jax.quant.fake_quant import fake_quant
from msfp_jax.quant.formats import FPFormat, candidates
from msfp_jax.quant.interceptor import (
    CodeDomainLayer,
    KernelUpdate,
    discover_layers,
    quantization_interceptor,
    quantize_kernel,
    quantized_apply,
)
from msfp_jax.quant.report import (
    format_report_table,
    layer_report,
    plot_activation_histograms,
    print_report,
    save_report_json,
    write_report,
)
from msfp_jax.quant.rules import LayerInfo
from msfp_jax.quant.search import calibrate, search_activation_quantizer, search_quant_state, search_weight_quantizer
from msfp_jax.quant.state import LayerQuantState, QuantState, load_quant_state, save_quant_state
from msfp_jax.quant.statistics import ActivationStatistics, CalibrationStatistics, collect_statistics
from msfp_jax.quant.trees import params_at, prequantize_weights

__all__ = [
    "ActivationStatistics", "CalibrationError", "CalibrationStatistics", "CodeDomainLayer", "FPFormat",
    "InvalidQuantConfigError", "KernelUpdate", "LayerInfo", "LayerQuantState", "QuantConfig", "QuantRule",
    "QuantState", "QuantStateMismatchError", "QuantizationError", "RuleMatchError", "calibrate", "candidates",
    "collect_statistics", "discover_layers", "fake_quant", "format_report_table", "layer_report",
    "load_quant_state", "params_at", "plot_activation_histograms", "prequantize_weights", "print_report",
    "quantization_interceptor", "quantize_kernel", "quantized_apply", "save_quant_state", "save_report_json",
    "search_activation_quantizer", "search_quant_state", "search_weight_quantizer", "write_report",
]
