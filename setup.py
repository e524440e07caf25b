"""Install rgref: `pip install -e .` (add `[test]` for the test tools)."""

from setuptools import find_packages, setup

setup(
    name="rgref",
    version="0.1.0",
    description="A NumPy reference implementation of RecurrentGemma (Griffin), "
                "with C/OpenMP kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rgref", "rgref.*"]),
    include_package_data=True,
    package_data={"rgref": ["data/*/*"]},
    install_requires=["numpy>=1.24", "cffi>=1.15", "sentencepiece>=0.1.99", "safetensors>=0.4"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6.80"]},
)
