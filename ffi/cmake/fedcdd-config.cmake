# fedcdd-config.cmake: lets a CMake project use libfedcdd:
#
#   find_package(fedcdd 0.1 REQUIRED)
#   target_link_libraries(app PRIVATE fedcdd::fedcdd)          # the shared library
#   target_link_libraries(app PRIVATE fedcdd::fedcdd_static)   # or the static one
#
# Installed into PREFIX/lib/cmake/fedcdd by ffi/install.sh; point CMake at it with
# -DCMAKE_PREFIX_PATH=PREFIX (or -Dfedcdd_DIR=PREFIX/lib/cmake/fedcdd). Relocatable: every
# path is relative to this file.

get_filename_component(_fedcdd_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
set(fedcdd_INCLUDE_DIRS "${_fedcdd_prefix}/include")

if(APPLE)
  set(_fedcdd_shared "${_fedcdd_prefix}/lib/libfedcdd.dylib")
elseif(WIN32)
  set(_fedcdd_shared "${_fedcdd_prefix}/bin/fedcdd.dll")
else()
  set(_fedcdd_shared "${_fedcdd_prefix}/lib/libfedcdd.so")
endif()

foreach(_fedcdd_file "${fedcdd_INCLUDE_DIRS}/fedcdd.h" "${_fedcdd_shared}"
        "${_fedcdd_prefix}/lib/libfedcdd.a")
  if(NOT EXISTS "${_fedcdd_file}")
    set(fedcdd_FOUND FALSE)
    set(fedcdd_NOT_FOUND_MESSAGE "fedcdd: ${_fedcdd_file} is missing (re-run ffi/install.sh)")
    return()
  endif()
endforeach()

if(NOT TARGET fedcdd::fedcdd)
  add_library(fedcdd::fedcdd SHARED IMPORTED)
  set_target_properties(fedcdd::fedcdd PROPERTIES
    IMPORTED_LOCATION "${_fedcdd_shared}"
    INTERFACE_INCLUDE_DIRECTORIES "${fedcdd_INCLUDE_DIRS}")
endif()

if(NOT TARGET fedcdd::fedcdd_static)
  add_library(fedcdd::fedcdd_static STATIC IMPORTED)
  # What the Rust standard library inside the archive needs from the system.
  set(_fedcdd_system_libs "")
  if(UNIX AND NOT APPLE)
    set(_fedcdd_system_libs gcc_s util rt pthread m ${CMAKE_DL_LIBS})
  elseif(APPLE)
    set(_fedcdd_system_libs "-framework CoreFoundation" iconv m)
  endif()
  set_target_properties(fedcdd::fedcdd_static PROPERTIES
    IMPORTED_LOCATION "${_fedcdd_prefix}/lib/libfedcdd.a"
    IMPORTED_LINK_INTERFACE_LANGUAGES "C"
    INTERFACE_INCLUDE_DIRECTORIES "${fedcdd_INCLUDE_DIRS}"
    INTERFACE_LINK_LIBRARIES "${_fedcdd_system_libs}")
endif()

set(fedcdd_LIBRARIES fedcdd::fedcdd)
set(fedcdd_FOUND TRUE)
unset(_fedcdd_file)
unset(_fedcdd_shared)
unset(_fedcdd_system_libs)
unset(_fedcdd_prefix)
