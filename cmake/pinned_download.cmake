# Downloads with pip, into the cache folder, the pinned files the build needs (the ggml archive, cuBLAS),
# each checked by sha256 and kept for the next build.

# The folder that keeps them: VTRIM_CACHE_DIR, else $XDG_CACHE_HOME/pyvtrim, else ~/.cache/pyvtrim.
function(vtrim_cache_dir out)
    if(DEFINED ENV{VTRIM_CACHE_DIR})
        set(dir "$ENV{VTRIM_CACHE_DIR}")
    elseif(DEFINED ENV{XDG_CACHE_HOME})
        set(dir "$ENV{XDG_CACHE_HOME}/pyvtrim")
    else()
        set(dir "$ENV{HOME}/.cache/pyvtrim")
    endif()
    file(MAKE_DIRECTORY "${dir}")
    set(${out} "${dir}" PARENT_SCOPE)
endfunction()

# vtrim_pip_download(<requirement> <file name pip saves> <sha256> <out var> <hint> ARGS <pip args>...
#                    [FALLBACK_ARGS <pip args>...])
# Sets <out var> to the verified file in the cache. A cached file with another sha256 is fetched again.
# FALLBACK_ARGS: a second try with other arguments when the first fails. <hint> ends the error message.
function(vtrim_pip_download requirement filename sha256 out hint)
    cmake_parse_arguments(PARSE_ARGV 5 arg "" "" "ARGS;FALLBACK_ARGS")
    vtrim_cache_dir(cache)
    set(file "${cache}/${filename}")
    if(EXISTS "${file}")
        file(SHA256 "${file}" have)
        if(NOT have STREQUAL sha256)
            message(STATUS "pyvtrim: cached ${file} has a wrong sha256; fetching it again")
            file(REMOVE "${file}")
        endif()
    endif()
    if(NOT EXISTS "${file}")
        if(NOT Python3_EXECUTABLE AND Python_EXECUTABLE)
            set(Python3_EXECUTABLE "${Python_EXECUTABLE}")
        endif()
        find_package(Python3 COMPONENTS Interpreter REQUIRED)
        message(STATUS "pyvtrim: fetching ${requirement} into ${cache}")
        execute_process(COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps ${arg_ARGS} "${requirement}"
                                -d "${cache}" RESULT_VARIABLE rc)
        if(NOT rc EQUAL 0 AND arg_FALLBACK_ARGS)
            execute_process(COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps ${arg_FALLBACK_ARGS}
                                    "${requirement}" -d "${cache}" RESULT_VARIABLE rc)
        endif()
        if(NOT rc EQUAL 0 OR NOT EXISTS "${file}")
            message(FATAL_ERROR "pyvtrim: could not download ${requirement}; ${hint}")
        endif()
        file(SHA256 "${file}" have)
        if(NOT have STREQUAL sha256)
            file(REMOVE "${file}")
            message(FATAL_ERROR "pyvtrim: sha256 mismatch for ${filename}: got ${have}")
        endif()
    endif()
    set(${out} "${file}" PARENT_SCOPE)
endfunction()
