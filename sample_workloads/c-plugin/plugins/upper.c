/* upper plugin: ASCII upper-casing. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

const char *plugin_describe(void)
{
    return "upper-case ASCII letters";
}

char *plugin_transform(const char *input)
{
    size_t n = strlen(input);
    char *out = malloc(n + 1);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        out[i] = (char)toupper((unsigned char)input[i]);
    out[n] = '\0';
    return out;
}
