// Turns run-time flags into compile-time constants so hot loops carry no per-element branches.
#pragma once

#define GRADFUSE_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                             \
    if (COND) {                                     \
      constexpr static bool CONST_NAME = true;      \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr static bool CONST_NAME = false;     \
      return __VA_ARGS__();                         \
    }                                               \
  }()
