# moegen_generate.cmake — generate MoE layers at build time and compile them into a target.
#
#   moegen_generate(TARGET <target> SPECS <spec.yaml>...
#                   [BACKEND cpu|cuda]        # default cpu
#                   [CPU_TARGET native|base|avx2|avx512|avx512-bf16|avx512-amx]  # default native
#                   [ARCH sm_XX]              # cuda: the architecture the tiles are chosen for
#                   [VARIANT <overrides>]     # e.g. "tile_rows=6,gemm=bfdot"
#                   [NAME <layer name>]       # only with one spec: when `name:` cannot be read
#                   [OUTPUT_DIR <dir>]        # default ${CMAKE_CURRENT_BINARY_DIR}/moegen; each
#                                             # layer's files go to <dir>/moe_<ident>/
#                   [OUT_VAR <var>])          # receives the generated sources and headers
#
# For each spec, `moegen gen` writes moe_<ident>.c (or .cu, with its host-side forward),
# moe_<ident>.h, the ABI headers and (cpu) moe_<ident>.flags into OUTPUT_DIR/moe_<ident> at
# build time; that directory
# is added to the target's include path, so code includes "moe_<ident>.h". <ident> is the spec's `name` with
# '-' and '.' made '_', read from the spec here at configure time (the spec is a configure
# dependency, so a rename is seen); `moegen gen --expect-prefix` refuses to write other names.
# A cuda .cu needs a target with the CUDA language enabled (nvcc compiles it; set
# CUDA_ARCHITECTURES to match ARCH). The cpu sources are compiled with the flags the runtime itself uses
# (@moe_<ident>.flags: -O3 -fopenmp, the instruction sets of CPU_TARGET); OpenMP and libm are
# linked. The command re-runs when a spec, the moegen executable (whose templates are built
# in) or this file changes. The headers pin their sources (README "Generate and link").
#
# The moegen executable: the `moegen` target of a moegen source tree (add_subdirectory,
# FetchContent), else the imported moegen::moegen_cli of an installed package.
include_guard(GLOBAL)
set(_MOEGEN_GENERATE_FILE "${CMAKE_CURRENT_LIST_FILE}")

function(_moegen_spec_ident spec out_var)
  file(STRINGS "${spec}" lines REGEX "^name[ \t]*:")
  list(LENGTH lines n)
  if(NOT n EQUAL 1)
    message(FATAL_ERROR "moegen_generate: ${spec}: expected one top-level `name:` line (found ${n}); "
                        "give NAME to moegen_generate")
  endif()
  if(NOT lines MATCHES "^name[ \t]*:[ \t]*[\"']?([A-Za-z][A-Za-z0-9_.-]*)[\"']?[ \t]*(#.*)?$")
    message(FATAL_ERROR "moegen_generate: ${spec}: cannot read the layer name from `${lines}`; "
                        "give NAME to moegen_generate")
  endif()
  string(REGEX REPLACE "[-.]" "_" ident "${CMAKE_MATCH_1}")
  set(${out_var} "${ident}" PARENT_SCOPE)
endfunction()

function(moegen_generate)
  cmake_parse_arguments(G "" "TARGET;BACKEND;CPU_TARGET;ARCH;VARIANT;NAME;OUTPUT_DIR;OUT_VAR" "SPECS" ${ARGN})
  if(G_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "moegen_generate: unknown arguments: ${G_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT G_TARGET OR NOT TARGET ${G_TARGET})
    message(FATAL_ERROR "moegen_generate: TARGET must name an existing target (got '${G_TARGET}')")
  endif()
  if(NOT G_SPECS)
    message(FATAL_ERROR "moegen_generate: SPECS is empty")
  endif()
  if(NOT G_BACKEND)
    set(G_BACKEND cpu)
  endif()
  if(NOT G_BACKEND MATCHES "^(cpu|cuda)$")
    message(FATAL_ERROR "moegen_generate: BACKEND must be cpu or cuda (got '${G_BACKEND}')")
  endif()
  if(NOT G_CPU_TARGET)
    set(G_CPU_TARGET native)
  endif()
  if(NOT G_OUTPUT_DIR)
    set(G_OUTPUT_DIR "${CMAKE_CURRENT_BINARY_DIR}/moegen")
  endif()
  list(LENGTH G_SPECS n_specs)
  if(G_NAME AND NOT n_specs EQUAL 1)
    message(FATAL_ERROR "moegen_generate: NAME needs exactly one spec")
  endif()

  # The moegen executable and what the generation depends on.
  if(TARGET moegen AND NOT TARGET moegen::moegen_cli)
    set(exe moegen)
  elseif(TARGET moegen::moegen_cli)
    set(exe moegen::moegen_cli)
  else()
    message(FATAL_ERROR "moegen_generate: no moegen executable (add moegen with add_subdirectory or "
                        "find_package(moegen CONFIG) first)")
  endif()
  get_target_property(aliased ${exe} ALIASED_TARGET)
  if(aliased)
    set(exe ${aliased})
  endif()

  set(all_outputs "")
  foreach(spec IN LISTS G_SPECS)
    get_filename_component(spec_abs "${spec}" ABSOLUTE BASE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
    if(NOT EXISTS "${spec_abs}")
      message(FATAL_ERROR "moegen_generate: spec ${spec_abs} does not exist")
    endif()
    set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${spec_abs}")
    if(G_NAME)
      string(REGEX REPLACE "[-.]" "_" ident "${G_NAME}")
    else()
      _moegen_spec_ident("${spec_abs}" ident)
    endif()
    set(stem "moe_${ident}")
    set(dir "${G_OUTPUT_DIR}/${stem}")
    set(args gen "${spec_abs}" -o "${dir}" --backend ${G_BACKEND} --expect-prefix ${stem})
    if(G_BACKEND STREQUAL "cpu")
      list(APPEND args --target ${G_CPU_TARGET})
      set(source "${dir}/${stem}.c")
      set(outputs "${source}" "${dir}/${stem}.h" "${dir}/${stem}.flags" "${dir}/moegen_kernel_abi.h")
    else()
      if(G_ARCH)
        list(APPEND args --arch ${G_ARCH})
      endif()
      set(source "${dir}/${stem}.cu")
      set(outputs "${source}" "${dir}/${stem}.h" "${dir}/moegen_cuda_abi.h" "${dir}/moegen_cuda_launch.h"
                  "${dir}/moegen_kernel_abi.h")
    endif()
    if(G_VARIANT)
      list(APPEND args --variant "${G_VARIANT}")
    endif()
    # `moegen gen` leaves unchanged files alone; touching them afterwards keeps the build from
    # running the command again, and an unchanged source recompiles only when the spec changed.
    add_custom_command(
      OUTPUT ${outputs}
      COMMAND ${exe} ${args}
      COMMAND ${CMAKE_COMMAND} -E touch_nocreate ${outputs}
      DEPENDS "${spec_abs}" ${exe} "${_MOEGEN_GENERATE_FILE}"
      COMMENT "moegen: generating ${stem} (${G_BACKEND}) from ${spec}"
      VERBATIM)
    target_sources(${G_TARGET} PRIVATE ${outputs})
    if(G_BACKEND STREQUAL "cpu")
      set_source_files_properties("${source}" TARGET_DIRECTORY ${G_TARGET} PROPERTIES
                                  COMPILE_OPTIONS "@${dir}/${stem}.flags"
                                  OBJECT_DEPENDS "${dir}/${stem}.flags")
    endif()
    target_include_directories(${G_TARGET} PRIVATE "${dir}")
    list(APPEND all_outputs ${outputs})
  endforeach()
  if(G_BACKEND STREQUAL "cpu")
    find_package(OpenMP REQUIRED COMPONENTS C)
    target_link_libraries(${G_TARGET} PRIVATE OpenMP::OpenMP_C m)
  endif()
  if(G_OUT_VAR)
    set(${G_OUT_VAR} ${all_outputs} PARENT_SCOPE)
  endif()
endfunction()
