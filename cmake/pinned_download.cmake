# Downloads, into the cache folder, the pinned files the build needs (the ggml archive, cuBLAS), each checked
# by sha256 and kept for the next build: with pip (vtrim_pip_download, the Python build) or with CMake's own
# file(DOWNLOAD) from a URL (vtrim_url_download, the C-only build: no Python on the machine).

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

# A cached file with another sha256 (a download cut short, a file replaced by hand) is removed, to be
# fetched again.
function(_vtrim_drop_if_wrong file sha256)
    if(EXISTS "${file}")
        file(SHA256 "${file}" have)
        if(NOT have STREQUAL sha256)
            message(STATUS "pyvtrim: cached ${file} has a wrong sha256; fetching it again")
            file(REMOVE "${file}")
        endif()
    endif()
endfunction()

# Moves a verified download from its private folder to its name in the cache; a wrong one is deleted and
# stops the build. Readers never see a partial file: the rename is the last step.
function(_vtrim_accept tmp name file sha256 what)
    file(SHA256 "${tmp}/${name}" have)
    if(NOT have STREQUAL sha256)
        file(REMOVE_RECURSE "${tmp}")
        message(FATAL_ERROR "pyvtrim: sha256 mismatch for ${name} from ${what}: got ${have}, expected ${sha256}")
    endif()
    file(RENAME "${tmp}/${name}" "${file}")
    file(REMOVE_RECURSE "${tmp}")
endfunction()

# vtrim_pip_download(<requirement> <file name pip saves> <sha256> <out var> <hint> ARGS <pip args>...
#                    [FALLBACK_ARGS <pip args>...])
# Sets <out var> to the verified file in the cache. A cached file with another sha256 is fetched again.
# FALLBACK_ARGS: a second try with other arguments when the first fails. <hint> ends the error message.
function(vtrim_pip_download requirement filename sha256 out hint)
    cmake_parse_arguments(PARSE_ARGV 5 arg "" "" "ARGS;FALLBACK_ARGS")
    vtrim_cache_dir(cache)
    set(file "${cache}/${filename}")
    # Builds running at the same time share the cache: one downloads while the others wait, and the file
    # appears under its name only once complete and verified (pip writes into a private folder first).
    file(LOCK "${cache}/.${filename}.lock" GUARD FUNCTION TIMEOUT 3600)
    _vtrim_drop_if_wrong("${file}" "${sha256}")
    if(NOT EXISTS "${file}")
        if(NOT Python3_EXECUTABLE AND Python_EXECUTABLE)
            set(Python3_EXECUTABLE "${Python_EXECUTABLE}")
        endif()
        find_package(Python3 COMPONENTS Interpreter REQUIRED)
        string(RANDOM LENGTH 12 tag)
        set(tmp "${cache}/.download-${tag}")
        file(REMOVE_RECURSE "${tmp}")
        message(STATUS "pyvtrim: fetching ${requirement} into ${cache}")
        execute_process(COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps ${arg_ARGS} "${requirement}"
                                -d "${tmp}" RESULT_VARIABLE rc)
        if(NOT rc EQUAL 0 AND arg_FALLBACK_ARGS)
            execute_process(COMMAND "${Python3_EXECUTABLE}" -m pip download --no-deps ${arg_FALLBACK_ARGS}
                                    "${requirement}" -d "${tmp}" RESULT_VARIABLE rc)
        endif()
        if(NOT rc EQUAL 0 OR NOT EXISTS "${tmp}/${filename}")
            file(REMOVE_RECURSE "${tmp}")
            message(FATAL_ERROR "pyvtrim: could not download ${requirement}; ${hint}")
        endif()
        _vtrim_accept("${tmp}" "${filename}" "${file}" "${sha256}" "pip (${requirement})")
    endif()
    set(${out} "${file}" PARENT_SCOPE)
endfunction()

# vtrim_url_download(<url> <file name in the cache> <sha256> <out var> <hint>)
# The same contract as vtrim_pip_download, with CMake's own download (https://, file://; no Python): one
# build downloads while the others wait on the lock, the file gets its name only once verified, a cached
# file with another sha256 is fetched again. The hash is checked here rather than by file(DOWNLOAD
# EXPECTED_HASH) so that a mismatch names the URL and both hashes, and the bad file is not kept.
function(vtrim_url_download url filename sha256 out hint)
    vtrim_cache_dir(cache)
    set(file "${cache}/${filename}")
    file(LOCK "${cache}/.${filename}.lock" GUARD FUNCTION TIMEOUT 3600)
    _vtrim_drop_if_wrong("${file}" "${sha256}")
    if(NOT EXISTS "${file}")
        string(RANDOM LENGTH 12 tag)
        set(tmp "${cache}/.download-${tag}")
        file(REMOVE_RECURSE "${tmp}")
        message(STATUS "pyvtrim: fetching ${url} into ${cache}")
        file(DOWNLOAD "${url}" "${tmp}/${filename}" STATUS status TLS_VERIFY ON INACTIVITY_TIMEOUT 120)
        list(GET status 0 code)
        if(NOT code EQUAL 0)
            list(GET status 1 why)
            file(REMOVE_RECURSE "${tmp}")
            message(FATAL_ERROR "pyvtrim: could not download ${url}: ${why} (${code}); ${hint}")
        endif()
        _vtrim_accept("${tmp}" "${filename}" "${file}" "${sha256}" "${url}")
    endif()
    set(${out} "${file}" PARENT_SCOPE)
endfunction()

# vtrim_unpack_once(<archive> <folder it holds> <a file inside, to tell it is complete>)
# Unpacks the archive next to itself once; concurrent builds wait for the one unpacking, and the folder
# appears under its name only once complete (unpacked into a private folder, then renamed).
function(vtrim_unpack_once archive folder marker)
    get_filename_component(cache "${archive}" DIRECTORY)
    file(LOCK "${archive}.unpack.lock" GUARD FUNCTION TIMEOUT 3600)
    if(EXISTS "${cache}/${folder}/${marker}")
        return()
    endif()
    string(RANDOM LENGTH 12 tag)
    set(tmp "${cache}/.unpack-${tag}")
    file(REMOVE_RECURSE "${tmp}" "${cache}/${folder}")   # a folder without the marker is a broken earlier try
    message(STATUS "pyvtrim: unpacking ${archive}")
    file(ARCHIVE_EXTRACT INPUT "${archive}" DESTINATION "${tmp}")
    if(NOT EXISTS "${tmp}/${folder}/${marker}")
        file(REMOVE_RECURSE "${tmp}")
        message(FATAL_ERROR "pyvtrim: ${archive} holds no ${folder}/${marker}")
    endif()
    file(RENAME "${tmp}/${folder}" "${cache}/${folder}")
    file(REMOVE_RECURSE "${tmp}")
endfunction()
