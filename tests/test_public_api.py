"""The public face: every name `codis_lib` exports resolves, lazily, and `import codis_lib` stays light."""
import subprocess
import sys

import codis_lib


def test_every_exported_name_resolves_to_the_object_of_its_module():
    import importlib

    missing = [name for name in codis_lib.__all__ if getattr(codis_lib, name, None) is None]
    assert missing == []
    for name, (module, attribute) in codis_lib._EXPORTS.items():
        assert getattr(codis_lib, name) is getattr(importlib.import_module(module), attribute), name
    assert sorted(codis_lib.__all__) == sorted(codis_lib._EXPORTS) and set(codis_lib.__all__) <= set(dir(codis_lib))


def test_the_training_function_is_the_engine_s_and_the_subpackage_keeps_its_name():
    from codis_lib import run_training
    from codis_lib.train.engine import train

    assert run_training is train
    assert codis_lib.train.__name__ == "codis_lib.train"  # the subpackage, not shadowed by a function


def test_an_unknown_name_is_an_attribute_error_naming_it():
    try:
        codis_lib.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("codis_lib.no_such_name resolved")


def test_importing_the_package_imports_no_torch():
    code = "import sys, codis_lib; print('torch' in sys.modules, len(codis_lib.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and int(out[1]) == len(codis_lib.__all__)
