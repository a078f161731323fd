/* crc32 plugin: replaces the text by its zlib CRC-32. Links libz, so loading
 * this plugin also makes the dynamic loader pull in libz.so.1 (a dependency
 * of a dlopen()ed library: invisible to `ldd ./main`). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

const char *plugin_describe(void)
{
    return "zlib CRC-32 of the text";
}

char *plugin_transform(const char *input)
{
    uLong crc = crc32(0L, (const Bytef *)input, (uInt)strlen(input));
    char *out = malloc(16);
    if (out == NULL)
        return NULL;
    snprintf(out, 16, "%08lx", (unsigned long)crc);
    return out;
}
