"""FOD (Focus the Discrepancy, ICCV 2023): the method, its training and its scoring.

Pure PyTorch + timm; knows nothing of the pipeline tools that call it. Importing the
package has no side effects: submodules load what they need when used.
"""

__version__ = "0.1.0"
