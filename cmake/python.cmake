# Python package support: libtokmix_torch.so registers tokmix's ops with the PyTorch dispatcher
# (torch.ops.tokmix.* in Python, c10::Dispatcher in C++); python/tokmix loads it.
# Included at the end of CMakeLists.txt. One translation unit with LibTorch headers (the PCH).

# The static libraries go into a shared one: position-independent code. Targets reusing tokmix's
# precompiled header must be compiled the same way (GCC refuses a PCH built with other -fpic/-fpie).
set_target_properties(tokmix tokmix_core tokmix_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)
if(TARGET tokmix_cuda)
  set_target_properties(tokmix_cuda PROPERTIES POSITION_INDEPENDENT_CODE ON)
endif()
foreach(t tokmix_cli test_ops test_nn test_data test_train test_infer test_dist bench_mix)
  if(TARGET ${t})
    target_compile_options(${t} PRIVATE -fPIC)
  endif()
endforeach()

# Registrations live in this library's own translation unit, so no linker drops them.
add_library(tokmix_torch SHARED src/torch/register_ops.cpp)
target_link_libraries(tokmix_torch PRIVATE tokmix)
target_compile_options(tokmix_torch PRIVATE -Wall ${TOKMIX_OPT_FLAGS})
target_precompile_headers(tokmix_torch REUSE_FROM tokmix)
# next to the package in the build tree: python/tokmix finds it there (or via TOKMIX_LIBRARY)
set_target_properties(tokmix_torch PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/lib)

# C++ callers of the dispatcher: test_ops loads the library and calls tokmix::mix through it.
if(TARGET test_ops)
  add_dependencies(test_ops tokmix_torch)
  target_compile_definitions(test_ops PRIVATE TOKMIX_TORCH_LIBRARY="$<TARGET_FILE:tokmix_torch>")
  target_link_libraries(test_ops PRIVATE ${CMAKE_DL_LIBS})
endif()

# Python tests: with a Python whose torch matches the LibTorch built against (the library is
# loaded into that interpreter), and pytest. TOKMIX_PYTHON overrides the search.
set(TOKMIX_PYTHON "" CACHE FILEPATH "Python with torch and pytest for the Python tests (default: searched)")
if(TOKMIX_TESTS)
  set(_py_candidates ${TOKMIX_PYTHON})
  if(NOT TOKMIX_PYTHON)
    find_program(_py_path python3)
    set(_py_candidates /usr/bin/python3 ${_py_path})
  endif()
  string(REGEX MATCH "^[0-9]+\\.[0-9]+" _torch_mm "${Torch_VERSION}")
  set(TOKMIX_TEST_PYTHON "")
  foreach(py ${_py_candidates})
    if(EXISTS "${py}" AND NOT TOKMIX_TEST_PYTHON)
      execute_process(COMMAND ${py} -c "import torch, pytest; print(torch.__version__)"
                      OUTPUT_VARIABLE _pyt OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc ERROR_QUIET)
      if(_rc EQUAL 0 AND _pyt MATCHES "^${_torch_mm}")
        set(TOKMIX_TEST_PYTHON ${py})
        set(_found_torch ${_pyt})
      elseif(_rc EQUAL 0)
        message(STATUS "tokmix: ${py} has torch ${_pyt}, LibTorch is ${Torch_VERSION}: not used for the Python tests")
      endif()
    endif()
  endforeach()
  if(TOKMIX_TEST_PYTHON)
    message(STATUS "tokmix: Python tests with ${TOKMIX_TEST_PYTHON} (torch ${_found_torch})")
    # the library is loaded next to the interpreter's own LibTorch: best when it is the very same files
    execute_process(COMMAND ${TOKMIX_TEST_PYTHON} -c
                    "import os, torch; print(os.path.realpath(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libc10.so')))"
                    OUTPUT_VARIABLE _py_c10 OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    get_filename_component(_our_c10 "${c10_LIBRARY}" REALPATH)
    if(NOT _py_c10 STREQUAL _our_c10)
      message(WARNING "tokmix: ${TOKMIX_TEST_PYTHON} loads ${_py_c10}; libtokmix_torch.so is built against ${_our_c10} "
                      "(same version ${_torch_mm}, other files)")
    endif()
    add_test(NAME python_tests
             COMMAND ${TOKMIX_TEST_PYTHON} -m pytest -q -p no:cacheprovider ${CMAKE_CURRENT_SOURCE_DIR}/tests/python)
    set_tests_properties(python_tests PROPERTIES LABELS python TIMEOUT 900
                         ENVIRONMENT "TOKMIX_LIBRARY=$<TARGET_FILE:tokmix_torch>;TOKMIX_CLI=$<TARGET_FILE:tokmix_cli>;PYTHONPATH=${CMAKE_CURRENT_SOURCE_DIR}/python;TOKMIX_TESTDATA=${CMAKE_CURRENT_SOURCE_DIR}/tests/data")
  else()
    message(STATUS "tokmix: no Python with torch ${_torch_mm} and pytest found; the Python tests are not registered")
  endif()
endif()
