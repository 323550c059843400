"""Maps the fixed top-level layout onto one import package.

adapters/<name>/ imports as mixerhub.adapters.<name> and config/ (the shipped configuration) as
mixerhub.shipped. Each adapter folder is found here, so adding one needs no edit to the build.
"""

from setuptools import find_packages, setup

_MAPPED = {"mixerhub.adapters": "adapters", "mixerhub.shipped": "config"}

packages = find_packages(include=["mixerhub", "mixerhub.*"])
for package, folder in _MAPPED.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir={"mixerhub": "mixerhub", **_MAPPED},
)
