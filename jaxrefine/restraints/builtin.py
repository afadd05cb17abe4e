"""placeholder"""
BUILTIN_RESIDUES = ()
def builtin_monlib_cif():
    return ""
