"""Where the built-in default model's weights ship inside the package."""
import pathlib


def default_model_path() -> pathlib.Path:
  """The directory of the shipped default model (load it with `msfp_jax.models.load(default_model_path())`)."""
  return pathlib.Path(__file__).resolve().parents[1] / "assets" / "default_model"
