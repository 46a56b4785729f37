from microtile._kernels._ukernel cimport kernel_set_t

# The kernel set for an ISA id (see ``isa_id``); never NULL for an id that ``available_isas``
# lists.  Valid for the life of the process.
cdef const kernel_set_t* kernel_set(int isa) noexcept nogil
