# The bundled network weights of a release build.
#
# The repository that the Extensions Index builds is a release export (`make release`): it holds each weight
# file's sha256 pin (Resources/Models/weights.cmake, written from the model cards) instead of the file, so that its
# history stays small however often the models are retrained. This fetches each pinned file once, at build time,
# checks its sha256, and returns the local paths; the files are then packaged with the module, so nothing is
# downloaded when the extension runs. The development repository keeps the weight files themselves and needs none
# of this.
#
# Also usable in script mode, which is how the tests run it:
#   cmake -DPINS=<weights.cmake> -DDESTINATION=<folder> [-DMSDSEGMENT_WEIGHTS_URL=<base URL>] -P MSDSegmentWeights.cmake

cmake_minimum_required(VERSION 3.16)

# pins_file sets MSDSEGMENT_WEIGHTS ("<file>=<sha256>" entries) and the default MSDSEGMENT_WEIGHTS_URL; a
# MSDSEGMENT_WEIGHTS_URL already set (a cache entry or -D) wins, so a mirror or a local folder (file://) can serve.
function(msdsegment_fetch_weights pins_file destination paths_variable)
  set(_url_given "${MSDSEGMENT_WEIGHTS_URL}")
  include("${pins_file}")
  if(_url_given)
    set(MSDSEGMENT_WEIGHTS_URL "${_url_given}")
  endif()
  set(_paths)
  foreach(_pin IN LISTS MSDSEGMENT_WEIGHTS)
    string(REGEX MATCH "^([^=]+)\\.pt=([0-9a-f]+)$" _matched "${_pin}")
    if(NOT _matched)
      message(FATAL_ERROR "MSDSegment: malformed weights pin '${_pin}' in ${pins_file}")
    endif()
    set(_stem "${CMAKE_MATCH_1}")
    set(_sha256 "${CMAKE_MATCH_2}")
    string(SUBSTRING "${_sha256}" 0 16 _short)
    set(_path "${destination}/${_stem}.pt")
    set(_have_it FALSE)
    if(EXISTS "${_path}")
      file(SHA256 "${_path}" _existing)
      if(_existing STREQUAL _sha256)
        set(_have_it TRUE)
      endif()
    endif()
    if(NOT _have_it)
      set(_source "${MSDSEGMENT_WEIGHTS_URL}/${_stem}-${_short}.pt")
      message(STATUS "MSDSegment: fetching ${_stem}.pt from ${_source}")
      file(DOWNLOAD "${_source}" "${_path}.part" EXPECTED_HASH SHA256=${_sha256} STATUS _status TLS_VERIFY ON)
      list(GET _status 0 _code)
      if(NOT _code EQUAL 0)
        file(REMOVE "${_path}.part")
        list(GET _status 1 _reason)
        message(FATAL_ERROR "MSDSegment: could not fetch ${_stem}.pt (sha256 ${_sha256}) from ${_source}: ${_reason}")
      endif()
      file(RENAME "${_path}.part" "${_path}")
    endif()
    list(APPEND _paths "${_path}")
  endforeach()
  set(${paths_variable} ${_paths} PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT PINS OR NOT DESTINATION)
    message(FATAL_ERROR "usage: cmake -DPINS=<weights.cmake> -DDESTINATION=<folder> -P ${CMAKE_CURRENT_LIST_FILE}")
  endif()
  msdsegment_fetch_weights("${PINS}" "${DESTINATION}" _fetched)
  foreach(_path IN LISTS _fetched)
    message(STATUS "MSDSegment: have ${_path}")
  endforeach()
endif()
