"""Installs nbp: sequence models that predict more than the next token.

The top-level packages follow the design card: `nbp` (models and the shared
training machinery), `layers` (Flax building blocks), `kernels` (Pallas kernels
beside their references) and `experiments` (entry points and configs).
"""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",  # preservation policies (config.keep_checkpoint_steps)
    "tensorflow-datasets>=4.9.8,<5",
    "array-record>=0.7",
    "grain>=0.2.12,<0.3",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1",
    "numpy>=1.26",
    "scikit-learn>=1.4",  # the handwritten digits that moving digits are built from
    "tqdm>=4.66",
    "tensorboardx>=2.6",
    "imageio>=2.34",
    "av>=12",  # mp4 decoding for video folders
    "matplotlib>=3.8",
    "etils[epath]>=1.7",
    # Aaren's real data: UCR/UEA .ts sets inside sktime, forecasting series in statsmodels and sktime,
    # gymnasium's classic-control environments, h5py for D4RL/Minari files.
    "sktime>=0.30",
    "statsmodels>=0.14",
    "pandas>=2.1",
    "gymnasium>=1.0",
    "h5py>=3.10",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "nbformat>=5.10", "ipython>=8", "scipy>=1.11"],
    "notebooks": ["jupyter", "ipykernel>=6.29", "nbformat>=5.10"],
}

setuptools.setup(
    name="nbp",
    version="0.1.0",
    description="JAX/Flax sequence models beyond next-token prediction: NBP, xAR, Aaren, EBT.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["nbp", "nbp.*", "layers", "layers.*", "kernels", "kernels.*", "experiments", "experiments.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
