"""Qt-free stand-ins for Slicer's scripted-module base classes (tests only).

The PyPI ``slicer-core`` package has no ``slicer.ScriptedLoadableModule`` (it
lives in the Qt application). This folder has no ``__init__.py`` on purpose:
slicer-core's ``slicer/__init__.py`` extends its package path, so placing
``Testing/slicer_stubs`` on ``sys.path`` (the ``slicer_modules`` fixture in
``Testing/conftest.py``) makes ``from slicer.ScriptedLoadableModule import ...``
resolve here. Only what the LungAtlas logic classes use is provided, with the
behaviour of Slicer's own classes (Base/Python/slicer/ScriptedLoadableModule.py):
module metadata on ``parent``, ``resourcePath``, and a singleton
``vtkMRMLScriptedModuleNode`` parameter node per module. Widgets cannot be set
up without Qt: ``setup`` raises.
"""
import logging
import os
import sys
import unittest

__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
           "ScriptedLoadableModuleWidget"]


def _module_dir(instance) -> str:
    return os.path.dirname(os.path.abspath(sys.modules[type(instance).__module__].__file__))


class _Parent:
    """What Slicer's qSlicerScriptedLoadableModule offers as ``parent`` to a module's constructor."""

    def __init__(self):
        self.title = ""
        self.categories = []
        self.dependencies = []
        self.contributors = []
        self.helpText = ""
        self.acknowledgementText = ""
        self.hidden = False


class ScriptedLoadableModule:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else _Parent()
        self.moduleName = self.__class__.__name__

    def resourcePath(self, filename):
        return os.path.join(_module_dir(self), "Resources", filename)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__.removesuffix("Widget")

    def resourcePath(self, filename):
        return os.path.join(_module_dir(self), "Resources", filename)

    def setup(self):
        raise RuntimeError("module widgets need the Slicer application (Qt); the tests use the logic classes")


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.parent = parent
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetModuleName(self.moduleName) if hasattr(node, "SetModuleName") else None
            self.setDefaultParameters(node)
            node = scene.AddNode(node)
        return node

    def setDefaultParameters(self, parameterNode):
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        logging.info(message)

    def takeScreenshot(self, name, description, type=-1):
        pass
