"""mpi4py, imported once, with an ImportError that says what to install when it fails."""

INSTALL_HINT = (
    'microtile.distributed needs mpi4py and an MPI library: pip install "microtile[mpi]" '
    "(which installs mpi4py) and an MPI implementation such as Open MPI (Debian/Ubuntu: "
    "apt-get install openmpi-bin libopenmpi-dev; macOS: brew install open-mpi)")


def load_mpi():
    """``mpi4py.MPI``, or ImportError naming the extra and the MPI library.

    Two failures look different from here: without mpi4py the import itself fails; with
    mpi4py but no MPI library to load (mpi4py's wheels load libmpi when ``MPI`` is
    imported) mpi4py raises RuntimeError or OSError.  Both become one ImportError, so
    ``except ImportError`` around ``import microtile.distributed`` covers them.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    except (RuntimeError, OSError) as exc:
        raise ImportError(f"{INSTALL_HINT}; mpi4py is installed but could not load an MPI "
                          f"library ({type(exc).__name__}: {exc})") from exc
    return MPI


MPI = load_mpi()
